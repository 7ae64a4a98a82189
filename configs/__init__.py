"""The shipped recipes; installed as t2i_recap.configs (read through t2i_recap.config_registry)."""
