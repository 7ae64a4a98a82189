"""`python -m t2i_recap.captioner ...` and `accelerate launch -m t2i_recap.captioner ...` run `caption run`."""

from .run import main

if __name__ == "__main__":
    raise SystemExit(main())
