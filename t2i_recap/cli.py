"""The `t2i-recap` console script: each subcommand is `main(argv)` of an importable module."""

from __future__ import annotations

import importlib
import sys

# (command words) -> module whose main(argv) runs it; each is also `python -m <module>`.
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("shapes", "make"): ("t2i_recap.shapes.make", "write shapes-world shards in img2dataset layout"),
    ("shapes", "assets"): ("t2i_recap.shapes.assets", "build the tiny tokenizer, CLIP and VAE"),
    ("caption", "run"): ("t2i_recap.captioner.run", "recaption shards with a vision-language model"),
    ("caption", "finetune"): ("t2i_recap.captioner.finetune", "fine-tune a LLaVA-architecture captioner"),
    ("caption", "convert"): ("t2i_recap.captioner.convert_llava", "convert an original LLaVA (llava_llama) checkpoint to transformers"),
    ("caption", "stats"): ("t2i_recap.captioner.stats", "statistics of recaption sidecars"),
    ("caption", "fidelity"): ("t2i_recap.captioner.fidelity", "caption fidelity against shapes-world scene graphs"),
    ("prepare",): ("t2i_recap.prepare", "build the feature cache (VAE latents + text embeddings)"),
    ("train",): ("t2i_recap.train", "train a DiT (also: accelerate launch -m t2i_recap.train)"),
    ("export",): ("t2i_recap.export", "export a run to a diffusers pipeline folder"),
    ("lora", "train"): ("t2i_recap.lora", "train LoRA adapters (peft) on an exported pipeline's DiT"),
    ("eval", "run"): ("t2i_recap.evaluate.run", "generate and score a prompt suite"),
    ("clip", "train"): ("t2i_recap.clip.train", "train a CLIP contrastively on shards (Recap-CLIP)"),
    ("clip", "sweep"): ("t2i_recap.clip.sweep", "train and score a CLIP per caption-mixing p (the paper's Table 3)"),
    ("eval", "retrieval"): ("t2i_recap.evaluate.retrieval", "zero-shot retrieval + classification of a CLIP folder"),
    ("eval", "compare"): ("t2i_recap.evaluate.compare", "compare evaluation runs in one table"),
    ("demo",): ("t2i_recap.demo", "the paper's finding end to end on the shapes world"),
}


def _usage() -> str:
    lines = ["usage: t2i-recap COMMAND [ARGS...]", "", "commands:"]
    for words, (_, helptext) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<18} {helptext}")
    lines.append("")
    lines.append("`t2i-recap COMMAND --help` shows a command's options. Every command takes --config FILE (YAML or a")
    lines.append("shipped recipe name) and --set KEY=VALUE (repeatable); its flags win over --set, which wins over the file.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from t2i_recap import __version__

        print(__version__)
        return 0
    for n in (2, 1):
        words = tuple(argv[:n])
        if words in COMMANDS:
            module = importlib.import_module(COMMANDS[words][0])
            return int(module.main(argv[n:]) or 0)
    print(f"t2i-recap: unknown command {' '.join(argv[:2])!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
