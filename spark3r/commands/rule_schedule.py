"""Write the paper-rule or uniform schedule of a model (how the shipped schedules/*-paper.yaml and *-uniform.yaml
were made).

    python -m spark3r.commands.rule_schedule --rule paper --model pi3 --global-layers 18 --sensitive 11-16 \\
        --out schedules/pi3-paper.yaml
"""
from __future__ import annotations

import shlex
import sys
import textwrap

from spark3r.commands.arguments import ArgumentParser, command
from spark3r.schedule import paper_schedule, range_text, save_schedule, uniform_schedule


def layer_range(text: str) -> list[int]:
    """"10-12,15" -> [10, 11, 12, 15]."""
    layers = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        layers.extend(range(int(first), int(last or first) + 1))
    return layers


@command
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m spark3r.commands.rule_schedule", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rule", choices=["paper", "uniform"], required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--global-layers", type=int, required=True)
    parser.add_argument("--sensitive", type=layer_range, required=True, help="sensitive global layers, e.g. 11-16")
    parser.add_argument("--note", default="", help="an extra header line")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.rule == "paper":
        schedule = paper_schedule(args.model, args.global_layers, args.sensitive)
        what = (f"The Spark3R paper's hand-set rule for {args.model}: r_Q 1/2/3/4 up to 100/300/500 frames and beyond; "
                f"r_KV = 1 up to 100 frames, else ceil(S/40), by frame stride; sensitive layers "
                f"{range_text(args.sensitive)} use r_KV, all others 3 x r_KV.")
    else:
        schedule = uniform_schedule(args.model, args.global_layers, len(args.sensitive))
        what = (f"Uniform K/V reduction for {args.model}: every layer {schedule.default.kv.factor} x r_KV, the paper "
                f"rule's mean K/V keep with {len(args.sensitive)} sensitive layers (comparable global-attention "
                f"FLOPs); r_Q and r_KV(S) as the paper.")
    made_by = (f"python -m spark3r.commands.rule_schedule --rule {args.rule} --model {args.model} --global-layers "
               f"{args.global_layers} --sensitive {range_text(args.sensitive)}"
               + (f" --note {shlex.quote(args.note)}" if args.note else "") + f" --out {args.out}")
    header = "\n".join([textwrap.fill(what, 116), *textwrap.wrap(args.note, 116), f"Made by: {made_by}"])
    save_schedule(schedule, args.out, header=header)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
