"""Offline batch runs: every request of a JSON-lines file through the continuous-batching engine,
results appended as they complete, resumable after a kill.

    python -m llama_int8.batch --ckpt_dir D --input requests.jsonl --output results.jsonl \\
        [--quant Q] [--max_batch_size 8] [--max_seq_len N] [--system "..."] [--max_tokens 256] [--temperature 0]

Takes example.py's model and sampling flags (cli.py: same names and defaults, but for
--max_batch_size 8, the requests generated at once, and --temperature 0, greedy, so that a resumed
run answers as an uninterrupted one would); a line's own max_tokens, temperature, top_p, seed, stop
(and the OpenAI API's other sampling fields) override them. --max_tokens is --max_gen_len under the
OpenAI API's name. The line formats and the results file are batch_files.py's; the work,
batch_runner.py's: chat lines go through the model's chat template as the server's do.

A line that cannot run (malformed, a field out of range, too long for --max_seq_len) gets an error
result and the run goes on. A rerun skips every id already in --output, errors included (delete an
error's line to retry it). The input and the results file are checked before torch is imported: a
duplicate id ends the run at once, the results untouched, and an --output that is the --input or
not a results file of this command is refused with not a byte of it changed (batch_files.py).
--sort_by_length starts the longest prompts first, so that no long prompt is left to run alone at
the end; results keep their ids.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .batch_files import Done, check_output_is_not_input, check_unique_ids, read_done, read_requests, resolve_output
from .cli import add_checkpoint_flags, add_runtime_flags, add_sampling_flags, build_kwargs, sampling_kwargs
from .flags import add_switch, add_tool_parser_flag, existing_path, make_parser, non_empty_text, positive_int, run_cli

log = logging.getLogger("llama_int8.batch")

DEFAULT_SLOTS = 8
DEFAULT_TEMPERATURE = 0.0  # greedy: a rerun of an interrupted run gives what the first run would have


# --- Flags -------------------------------------------------------------------------------------------

def output_path(text: str) -> str:
    """A results file whose folder exists, or a link to one: told before the model loads, not after
    the first result. A link is judged by the file it leads to, where the results go."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a file path, got an empty string")
    try:
        path = resolve_output(Path(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    named = text if path == Path(text) else f"{text} (a link to {path})"
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{named}: the folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{named}: is a folder; expected a file to append results to")
    if path.exists() and not path.is_file():  # a FIFO or a device: a resume would read it, and wait or worse
        raise argparse.ArgumentTypeError(f"{named}: is not a regular file; expected a file to append results to")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("python -m llama_int8.batch", "Run every request of a JSON-lines file through the model, "
                                                       "resumably; results as JSON lines.")
    add_checkpoint_flags(parser)
    add_runtime_flags(parser)
    add_sampling_flags(parser)
    parser.set_defaults(max_batch_size=DEFAULT_SLOTS, temperature=DEFAULT_TEMPERATURE)
    group = parser.add_argument_group("batch")
    group.add_argument("--input", type=existing_path, required=True, metavar="PATH",
                       help="requests, one JSON object a line: {id, prompt or messages, ...} or the OpenAI Batch "
                            "API's {custom_id, method, url, body} (required)")
    group.add_argument("--output", type=output_path, required=True, metavar="PATH",
                       help="results, appended one JSON line per request; ids already there are skipped (required)")
    group.add_argument("--max_tokens", dest="max_gen_len", type=positive_int, default=argparse.SUPPRESS,
                       metavar="N", help="--max_gen_len under the OpenAI API's name, which request lines use too")
    group.add_argument("--system", type=non_empty_text, metavar="TEXT",
                       help="system message of every chat line that has none (default: none)")
    add_switch(group, "--sort_by_length", "start the longest prompts first (default: off, in file order)")
    add_tool_parser_flag(group)
    return parser


def main(args: argparse.Namespace) -> None:
    input_path, given = Path(args.input), Path(args.output)
    if args.max_gen_len < 1:
        raise ValueError("--max_gen_len: expected at least 1 token per answer in a batch run, got 0")
    check_output_is_not_input(given, input_path)
    lines = read_requests(input_path)
    check_unique_ids(lines, input_path)
    output = resolve_output(given)
    done = read_done(output)
    if output != given:
        log.info("--output %s is a link to %s: results go there", given, output)
    todo = [line for line in lines if not done.covers(line)]
    log_resume(input_path, output, len(lines), len(todo), done)
    if not todo:
        return
    # Only now torch: the files' problems are told in a fraction of a second, as the flags' are.
    from .batch_runner import BatchSettings, run_batch
    from .generation import Llama
    from .serve import served_name

    sampling = sampling_kwargs(args)
    settings = BatchSettings(max_tokens=sampling.pop("max_gen_len"), sampling=sampling, system=args.system,
                             sort_by_length=args.sort_by_length, tool_parser=args.tool_parser)
    kwargs = build_kwargs(args)
    run_batch(Llama.build(**kwargs), todo, input_path, output, settings, served_name(kwargs["ckpt_dir"]))


def log_resume(input_path: Path, output: Path, total: int, todo: int, done: Done) -> None:
    if total == todo:
        log.info("%d requests in %s", total, input_path)
    elif todo == 0:
        log.info("Nothing to do: all %d requests of %s are already in %s", total, input_path, output)
    else:
        log.info("%d of %d requests in %s left to run; %d are already in %s", todo, total, input_path, total - todo,
                 output)
    if done.id_less_lines:
        log.debug("%d malformed lines were reported by an earlier run", len(done.id_less_lines))


if __name__ == "__main__":
    run_cli(build_parser(), main)
