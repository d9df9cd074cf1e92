"""One checkpoint on two devices: greedy tokens and logits on --device against a float32 reference on
the CPU, case by case (a quantization mode, and the dtype the device computes in).

    python -m benchmarks.device_agreement --ckpt_dir model.gguf --device cuda
    python -m benchmarks.device_agreement --ckpt_dir model.gguf --device cuda --cases none:float32,int8:default --json

For each case both sides generate --new_tokens greedily from the same prompt; then both score the
reference's whole sequence in one forward (teacher forcing), so that one early difference does not
hide how close the rest is. Reported: how many leading greedy tokens agree, the relative L2
difference of the logits, how often their argmax agrees on the generated positions, and whether
every logit is finite.

What agreement means depends on the case (TOLERANCE): float32 without quantization runs the same
arithmetic on both devices, so its greedy tokens must be equal (unless, where they first differ, the
reference's two best logits were a tie: within TIE of its largest) and its logits within 1e-4. The
quantized modes run other kernels on each device (bitsandbytes' CUDA int8 writes float16, its 4-bit
kernels compute in the activations' dtype or, on the CPU, bfloat16), and a 16-bit dtype rounds
differently: there only the logits must be close, and greedy tokens are reported as they are.
Exits 1 when a case disagrees.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from benchmarks.common import report
from llama_int8 import Llama
from llama_int8.flags import add_switch, device_name, make_parser, positive_int, run_cli

# Relative L2 difference of the logits allowed, by (mode, whether the device computes in float32).
TOLERANCE = {("none", True): 1e-4, ("int8", True): 2e-2, ("nf4", True): 3e-2,
             ("none", False): 3e-2, ("int8", False): 5e-2, ("nf4", False): 6e-2}
TIE = 1e-3  # two logits closer than this fraction of the largest are a tie: either token is right
DEFAULT_CASES = "none:float32,int8:float32,nf4:float32,int8:default"


@dataclass(frozen=True)
class Case:
    mode: str  # --quant
    dtype: str | None  # the device's activations; None: its default (bfloat16 on a GPU that has it)

    @property
    def name(self) -> str:
        return f"{self.mode}:{self.dtype or 'default'}"


def parse_cases(text: str) -> list[Case]:
    cases = []
    for item in text.split(","):
        mode, _, dtype = item.strip().partition(":")
        if mode not in {m for m, _ in TOLERANCE} or dtype not in ("float32", "bfloat16", "float16", "default"):
            raise ValueError(f"cases: {item!r} is not MODE:DTYPE with MODE one of none, int8, nf4 and DTYPE one "
                             "of float32, bfloat16, float16, default")
        cases.append(Case(mode, None if dtype == "default" else dtype))
    return cases


def greedy(llm: Llama, prompt: list[int], new_tokens: int) -> list[int]:
    return llm.generate([prompt], max_gen_len=new_tokens, temperature=0, stop_ids=())[0]


@torch.inference_mode()
def sequence_logits(llm: Llama, tokens: list[int]) -> torch.Tensor:
    """Float32 logits [len(tokens), vocab] on the CPU, every position scored in one forward."""
    return llm.model(torch.tensor([tokens], device=llm.model.device), 0)[0].float().cpu()


def leading_agreement(ours: list[int], reference: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), min(len(ours), len(reference)))


def compare(ours: Llama, reference: Llama, case: Case, prompt: list[int], new_tokens: int) -> dict:
    """One row: how ours agrees with reference on prompt's greedy continuation."""
    want, got = greedy(reference, prompt, new_tokens), greedy(ours, prompt, new_tokens)
    ref_logits = sequence_logits(reference, prompt + want)  # [T, vocab]
    our_logits = sequence_logits(ours, prompt + want)
    generated = slice(len(prompt) - 1, len(prompt) - 1 + len(want))  # positions that predicted want
    same = leading_agreement(got, want)
    greedy_text = f"{same}/{len(want)}"
    tie = False
    if same < len(want):
        scores = ref_logits[len(prompt) - 1 + same]
        best = scores.topk(2).values
        margin = (best[0] - best[1]).item()
        tie = margin < TIE * scores.abs().max().item()
        greedy_text += f" (then {'a tie' if tie else 'no tie'}: margin {margin:.3g})"
    relative = ((our_logits - ref_logits).norm() / ref_logits.norm()).item()
    finite = bool(torch.isfinite(our_logits).all())
    computes_in_float32 = ours.model.norm.weight.dtype == torch.float32
    tolerance = TOLERANCE[(case.mode, computes_in_float32)]
    exact_case = case.mode == "none" and computes_in_float32
    agrees = finite and relative <= tolerance and (not exact_case or same == len(want) or tie)
    argmax_agrees = (our_logits[generated].argmax(-1) == ref_logits[generated].argmax(-1)).float().mean().item()
    return {"case": case.name, "dtype": str(ours.model.norm.weight.dtype).removeprefix("torch."),
            "greedy tokens equal": greedy_text, "logits rel. diff": relative, "tolerance": tolerance,
            "argmax agrees": f"{argmax_agrees:.0%}", "finite": finite, "agrees": "yes" if agrees else "NO"}


def main(args: argparse.Namespace) -> None:
    cases = parse_cases(args.cases)
    build = dict(max_batch_size=1, max_seq_len=args.max_seq_len)
    references: dict[str, Llama] = {}  # one float32 CPU model per mode
    rows = []
    for case in cases:
        if case.mode not in references:
            references[case.mode] = Llama.build(args.ckpt_dir, quant=case.mode, device=args.reference, dtype="float32",
                                                **build)
        reference = references[case.mode]
        prompt = reference.tokenizer.encode(args.prompt, bos=True, eos=False)
        if len(prompt) + args.new_tokens > args.max_seq_len:
            raise ValueError(f"the prompt ({len(prompt)} tokens) and --new_tokens {args.new_tokens} exceed "
                             f"--max_seq_len {args.max_seq_len}")
        ours = Llama.build(args.ckpt_dir, quant=case.mode, device=args.device, dtype=case.dtype, **build)
        rows.append({"device": str(ours.model.device), **compare(ours, reference, case, prompt, args.new_tokens)})
        del ours
    report(f"Agreement with the CPU (float32): {args.ckpt_dir}, {args.new_tokens} greedy tokens", rows, args.json,
           {"reference": f"{args.reference} float32", "prompt": args.prompt})
    if any(row["agrees"] != "yes" for row in rows):
        sys.exit(1)


def parser() -> argparse.ArgumentParser:
    p = make_parser("python -m benchmarks.device_agreement", "Greedy tokens and logits of a checkpoint on a "
                    "device against the CPU in float32.")
    p.add_argument("--ckpt_dir", required=True, metavar="PATH", help="the checkpoint (a folder or a .gguf file)")
    p.add_argument("--device", type=device_name, default="cuda", help="the device checked (default: cuda)")
    p.add_argument("--reference", type=device_name, default="cpu", help="where the reference runs (default: cpu)")
    p.add_argument("--cases", default=DEFAULT_CASES, metavar="LIST",
                   help=f"MODE:DTYPE pairs, DTYPE default meaning the device's own (default: {DEFAULT_CASES})")
    p.add_argument("--prompt", default="The capital of France is", help="the text continued (default: %(default)r)")
    p.add_argument("--new_tokens", type=positive_int, default=32, help="greedy tokens compared (default: 32)")
    p.add_argument("--max_seq_len", type=positive_int, default=128, help="the KV cache's length (default: 128)")
    add_switch(p, "--json", "print one JSON object instead of a Markdown table (default: off)")
    return p


if __name__ == "__main__":
    run_cli(parser(), main)
