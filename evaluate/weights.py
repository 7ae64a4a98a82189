"""Local model files for metrics (the checks live in the core: t2i_recap.model_files)."""

from t2i_recap.model_files import (WEIGHT_FILES, MissingWeightsError, folder_sha256, require_file,  # noqa: F401
                                   require_model_dir)
