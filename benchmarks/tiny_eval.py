"""The bundled vggt-tiny on held-out generated clips: the model, frame-only global attention, trivial baselines.

    python benchmarks/tiny_eval.py        # -> benchmarks/results/eval-vggt-tiny.json (the README's tiny-model table)

Runs `python -m spark3r.commands.train_tiny --evaluate WEIGHTS --clips CLIPS --frames FRAMES --json` in this process and
writes what it prints (the metrics per clip length), with the command, commit and device (and the sha256 of a weights
file). --logit-scale T evaluates the weights with every global attention's logits multiplied by T
(`scale_global_logits`, as `tiny_attention.py --logit-scale` and `train_tiny --init-logit-scale`).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import sys
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from spark3r.commands import train_tiny
from spark3r.files import write_json
from spark3r.models.loading import load_model
from spark3r.training.tiny import scale_global_logits

_spec = importlib.util.spec_from_file_location("benchmarks_provenance",
                                              Path(__file__).resolve().parent / "provenance.py")
provenance = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(provenance)
sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_attention  # noqa: E402  (its --logit-scale type)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="auto", help="weights to evaluate (default: the bundled ones)")
    parser.add_argument("--clips", default="synthetic:64:1000",
                        help="held-out clips (default %(default)s: orbit clips, like the bundled weights' training)")
    parser.add_argument("--frames", default="8", help="frames per clip, or several lengths: 8,32,128")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="compute dtype (auto: bf16 on CUDA; fp32 to compare with a "
                                                        "CPU evaluation)")
    parser.add_argument("--logit-scale", type=tiny_attention.logit_scale, default=1.0,
                        help="multiply every global attention's logits by this factor first")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/eval-vggt-tiny.json"))
    args = parser.parse_args(argv)
    printed = io.StringIO()
    with tempfile.TemporaryDirectory() as scratch:
        evaluated = args.weights
        if args.logit_scale != 1.0:
            model = load_model("vggt-tiny", weights=args.weights, device="cpu")
            scale_global_logits(model, args.logit_scale)
            evaluated = str(Path(scratch) / "vggt-tiny-scaled.safetensors")
            save_file(model.state_dict(), evaluated)
        with contextlib.redirect_stdout(printed):
            code = train_tiny.main(["--evaluate", evaluated, "--clips", args.clips, "--frames", args.frames,
                                    "--device", args.device, "--dtype", args.dtype, "--json"])
    if code != 0:
        return code
    write_json(args.out, {**provenance.record(__file__, argv, args.device),
                          **provenance.weights_identity("vggt-tiny", args.weights),
                          "logit_scale": args.logit_scale, **json.loads(printed.getvalue())})
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
