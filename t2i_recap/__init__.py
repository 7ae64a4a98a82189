"""t2i-recap: recaption web image-text data and train text-to-image DiTs on the recaptions."""

__version__ = "0.1.0"
