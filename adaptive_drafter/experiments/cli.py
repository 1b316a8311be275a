"""What every benchmark script shares around its measurement: YAML presets of its flags, the machine in one line, and
the JSON record (date, command, arguments, machine, results)."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any


def machine_line(machine: dict[str, Any], device: str = "cpu") -> str:
    """`machine_info` in one line for the console."""
    return (
        f"machine: {machine['platform']} | {machine['cpu_count']} CPU cores | torch threads {machine['torch_threads']}"
        f" | load avg {machine.get('load_avg_1min', '?')} | torch {machine['torch']} | transformers "
        f"{machine['transformers']} | device {device}" + (f" ({machine['cuda']})" if device != "cpu" else "")
    )


def write_json(path: Path, args: Any, meta: dict[str, Any], **results: Any) -> None:
    """Write `results` to `path` beside the run's metadata: date, command line, arguments (`args`: a Namespace or a
    dict) and `meta` (the machine, the model, ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arguments = args if isinstance(args, dict) else vars(args)
    meta = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=" ".join(sys.argv),
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in arguments.items()},
        **meta,
    )
    path.write_text(json.dumps(dict(meta=meta, **results), indent=2) + "\n")
    print(f"wrote {path}")


def parse_with_preset(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `argv` with `--preset PATH` added: a YAML mapping of flag names (underscores: `max_new_tokens: 32`) to
    values, which become the parser's defaults, so flags given on the command line override them. Unknown keys are an
    error (a typo would otherwise silently run the wrong benchmark)."""
    parser.add_argument("--preset", type=Path, default=None, help="YAML of flag defaults (configs/bench/*.yaml)")
    known, _ = parser.parse_known_args(argv)
    if known.preset is not None:
        import yaml

        preset = yaml.safe_load(known.preset.read_text()) or {}
        if not isinstance(preset, dict):
            parser.error(f"--preset {known.preset}: expected a mapping of flag names to values")
        dests = {action.dest for action in parser._actions} - {"help", "preset"}
        unknown = sorted(set(preset) - dests)
        if unknown:
            parser.error(
                f"--preset {known.preset}: unknown keys {', '.join(unknown)} (flags: {', '.join(sorted(dests))})"
            )
        for action in parser._actions:  # argparse checks choices on the command line only, not on defaults
            if action.choices is not None and action.dest in preset and preset[action.dest] not in action.choices:
                parser.error(f"--preset {known.preset}: {action.dest} must be one of {', '.join(action.choices)}")
        # argparse converts string defaults with the flag's `type` (paths, numbers); lists become comma-separated.
        parser.set_defaults(**{k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in preset.items()})
    return parser.parse_args(argv)
