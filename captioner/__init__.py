"""Recaptioning: readers, backends, prompts, writer, stats, fine-tuning (installed as t2i_recap.captioner)."""
