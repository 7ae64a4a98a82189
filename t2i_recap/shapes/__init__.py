"""The shapes world: procedural scenes of coloured shapes with exact scene graphs.

The embedded default world (see docs/DESIGN.md): a renderer, noisy "web" alt-texts, gold dense
captions, an oracle that reads images back into scene graphs and a parser that reads captions back.
"""

from t2i_recap.shapes.world import (
    COLORS,
    COLS,
    ROWS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    relation,
    sample_scene,
)

__all__ = ["COLORS", "COLS", "ROWS", "SHAPES", "SIZES", "Obj", "Scene", "relation", "sample_scene"]
