"""FastGen against Hugging Face fp32, per architecture and probe length, with and without the project's
fixes: the correctness gate's own measure (teacher-forced logits, mean |dlogit| relative to HF fp16's, each
probe alone and all probes in one full batch, chunked as the server chunks) on tiny random models whose
attention depends on position (initializer_range 0.1, random token ids).

    python benchmarks/fastgen_gate_table.py --out results/fastgen-gate.jsonl            # every architecture
    python benchmarks/fastgen_gate_table.py --archs llama --variants fixed atoms-by-sequences --json

Variants:
  fixed                the project's engine (attention atoms sized by handlers.fastgen_model.attention_atoms,
                       fp32 rotary frequencies, the model's norm eps)
  atoms-by-sequences   as before the fix: DeepSpeed's atom buffer holds as many atoms as sequences
  fp16-rotary          DeepSpeed's own rotary (inverse frequencies rounded to fp16), atoms fixed
  boundary             the fixed engine's exact-fill step (max_sequences - 1 decodes and one full prefill chunk:
                       exactly `attention_atoms` atoms), and the same step with a buffer one atom short
One process per architecture (in parallel: DeepSpeed keeps its KV allocation until the process ends, and a put
past the atom buffer writes past a pinned host buffer, so the "before" variants run last and alone).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ARCHS = ("llama", "llama3.1", "mistral", "qwen2", "phi3", "phi", "falcon", "opt")
VARIANTS = ("fixed", "fp16-rotary", "atoms-by-sequences")
VOCAB = 1024


def tiny_config(kind: str, context: int = 8192):
    """A small random model of each architecture FastGen serves, its norm eps and rope as real models set
    them, initializer_range 0.1 so that attention depends on position (HF's 0.02 makes it nearly uniform)."""
    from transformers import (FalconConfig, LlamaConfig, MistralConfig, OPTConfig, Phi3Config, PhiConfig,
                              Qwen2Config)
    common = dict(vocab_size=VOCAB, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                  max_position_embeddings=context, initializer_range=0.1)
    if kind == "llama":  # Llama-2's eps is 1e-5, Llama-3's 1e-5, LlamaConfig's default 1e-6: take 1e-6
        return LlamaConfig(num_attention_heads=8, num_key_value_heads=4, rms_norm_eps=1e-6, **common)
    if kind == "llama3.1":
        return LlamaConfig(num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5,
                           rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 1024,
                                            "rope_theta": 500000.0}, **common)
    if kind == "mistral":
        return MistralConfig(num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5, sliding_window=None,
                             **common)
    if kind == "qwen2":
        return Qwen2Config(num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6, **common)
    if kind == "phi3":
        return Phi3Config(num_attention_heads=8, num_key_value_heads=8, rms_norm_eps=1e-5, pad_token_id=0, **common)
    if kind == "phi":
        return PhiConfig(num_attention_heads=8, partial_rotary_factor=0.5, layer_norm_eps=1e-5, **common)
    if kind == "falcon":
        return FalconConfig(vocab_size=VOCAB, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                            new_decoder_architecture=True, num_kv_heads=2, max_position_embeddings=context,
                            initializer_range=0.1, tie_word_embeddings=False)  # as Falcon checkpoints ship
    if kind == "opt":
        return OPTConfig(vocab_size=VOCAB, hidden_size=512, ffn_dim=1024, num_hidden_layers=4, num_attention_heads=8,
                         max_position_embeddings=context, word_embed_proj_dim=512, init_std=0.1)
    raise ValueError(kind)


def saved_model(kind: str, directory: Path, context: int = 8192) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(kind, context)).save_pretrained(directory)
    return str(directory)


def references_for(path: str, lengths: list[int], int8: bool = False):
    """HF fp32 and fp16 logits of the probes; with `int8`, the fp16 model's linear layers W8A8 as the AutoTP
    engine quantizes them (quantize=dynamic_int8), the reference an int8 engine is held to."""
    import torch
    from transformers import AutoModelForCausalLM

    from handlers.correctness_gate import hf_references, probe_tokens
    from quantization.quantizer import DYNAMIC_INT8, quantize_model

    prepare = (lambda model: quantize_model(model, DYNAMIC_INT8)) if int8 else None
    return hf_references(lambda dtype: AutoModelForCausalLM.from_pretrained(path, dtype=dtype),
                         [probe_tokens(VOCAB, n) for n in lengths], torch.float16, torch.device("cuda"),
                         prepare_half=prepare)


def engine_for(path: str, variant: str, max_sequences: int, prefill: int, kv_blocks: int = 1024):
    """(FastGenRunner, AtomRoom) of one variant; the runner checks atoms only for `fixed` and `int8` (the fixed
    engine with W8A8 linear layers, handlers/fastgen_int8.py)."""
    import dataclasses

    import torch
    from transformers import AutoConfig

    from handlers import fastgen_model
    from handlers.fastgen_runner import FastGenRunner

    limits = fastgen_model.EngineLimits(max_sequences=max_sequences, max_prefill_tokens=prefill, max_context=8192,
                                        reserve_bytes=0, kv_blocks=kv_blocks)
    hf_config = AutoConfig.from_pretrained(path)
    bridges = fastgen_model.preflight(hf_config, 8192)
    if variant == "fp16-rotary":
        bridges = dataclasses.replace(bridges, inv_freqs=None)
    original = fastgen_model.attention_atoms
    if variant == "atoms-by-sequences":  # DeepSpeed 0.19.8 as the project configured it before
        fastgen_model.attention_atoms = lambda sequences, tokens, q: sequences
    elif variant == "one-atom-short":
        fastgen_model.attention_atoms = lambda sequences, tokens, q: original(sequences, tokens, q) - 1
    try:
        engine, _, room = fastgen_model.build_fastgen_engine(path, hf_config, limits, torch.float16, bridges=bridges,
                                                             int8_linear=variant == "int8")
    finally:
        fastgen_model.attention_atoms = original
    if variant == "no-put-fence":  # the fixed engine, but puts issued without waiting for the previous one
        return FastGenRunner(engine, "cuda", room, fence=lambda: _NoWait()), room
    return FastGenRunner(engine, "cuda", room if variant in ("fixed", "int8") else None), room


class _NoWait:
    def synchronize(self) -> None:
        pass


def gate_rows(kind: str, variants: list[str], lengths: list[int], max_sequences: int, prefill: int,
              workdir: Path) -> list[dict]:
    from handlers.correctness_gate import run_gate
    from handlers.fastgen_model import FastGenUnsupported

    path = saved_model(kind, workdir / kind)
    references = references_for(path, lengths)
    rows = []
    for variant in variants:
        try:
            runner, room = engine_for(path, variant, max_sequences, prefill)
        except FastGenUnsupported as refusal:  # DeepSpeed without a bridge refuses some configs outright
            rows.append({"arch": kind, "variant": variant, "refused": str(refusal)})
            print(json.dumps(rows[-1]), flush=True)
            continue
        started = time.perf_counter()
        result = run_gate(references, runner.ragged_forward, runner.release, max_sequences=max_sequences,
                          max_prefill_tokens=prefill, vocab_size=VOCAB, tolerance=1.5)
        rows.append({"arch": kind, "variant": variant, "atom_room": room.atoms, "q_block": room.q_block,
                     "max_sequences": max_sequences, "prefill_tokens": prefill, "passed_at_1.5x": result.passed,
                     "seconds": round(time.perf_counter() - started, 2),
                     "probes": [{"positions": p.positions, "batch": p.batch, "ratio": round(p.ratio, 3),
                                 "argmax_agreement": round(p.argmax_agreement, 3)} for p in result.probes]})
        print(json.dumps(rows[-1]), flush=True)
        del runner
    return rows


def boundary_rows(workdir: Path, max_sequences: int = 4, prefill: int = 2048) -> list[dict]:
    """The exact-fill step: max_sequences - 1 fillers decode while one probe's prefix of exactly `prefill`
    tokens goes in one chunk (attention_atoms atoms, the probe last); then a prefix of 3 x prefill that the
    budget splits over steps, beside the same fillers. Fixed engine vs a buffer one atom short."""
    from handlers.correctness_gate import TAIL, compare, teacher_forced_tails
    from handlers.fastgen_model import atoms_needed

    path = saved_model("llama", workdir / "llama-boundary")
    lengths = [prefill + TAIL, 3 * prefill + TAIL]
    references = references_for(path, lengths)
    rows = []
    for variant in ("fixed", "one-atom-short"):
        runner, room = engine_for(path, variant, max_sequences, prefill)
        for reference in references:
            atoms = []

            def forward(sequences, tokens):
                atoms.append(atoms_needed([len(t) for t in tokens], room.q_block))
                return runner.ragged_forward(sequences, tokens)

            logits, = teacher_forced_tails(forward, runner.release, [reference.tokens], max_sequences=max_sequences,
                                           max_prefill_tokens=prefill, vocab_size=VOCAB, fillers=True)
            probe = compare(reference, logits, max_sequences)
            rows.append({"arch": "llama", "variant": variant, "atom_room": room.atoms, "positions": probe.positions,
                         "most_atoms_in_a_step": max(atoms), "steps": len(atoms), "ratio": round(probe.ratio, 3),
                         "argmax_agreement": round(probe.argmax_agreement, 3)})
            print(json.dumps(rows[-1]), flush=True)
        del runner
    return rows


def one(args: argparse.Namespace) -> int:
    import tempfile

    if args.no_fast_math:  # before DeepSpeed builds or loads an op
        import ds_no_fast_math
        ds_no_fast_math.apply()

    workdir = Path(tempfile.mkdtemp(prefix="fastgen-gate-"))
    if args.archs == ["boundary"]:
        rows = boundary_rows(workdir)
    else:
        rows = [row for kind in args.archs for row in gate_rows(kind, args.variants, args.lengths,
                                                               args.max_sequences, args.prefill_tokens, workdir)]
    for row in rows:
        row["ds_fast_math"] = not args.no_fast_math
    if args.json:
        print("RESULT " + json.dumps(rows), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS) + ["boundary"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--lengths", type=int, nargs="+", default=[48, 600, 2000, 4000])
    parser.add_argument("--max-sequences", type=int, default=8)
    parser.add_argument("--prefill-tokens", type=int, default=4096, help="the server's default prefill budget")
    parser.add_argument("--no-fast-math", action="store_true", help="DeepSpeed's ops without --use_fast_math "
                        "(benchmarks/ds_no_fast_math.py; give this run its own TORCH_EXTENSIONS_DIR)")
    parser.add_argument("--json", action="store_true", help="in one process: print the rows as one RESULT line")
    parser.add_argument("--out", default=None, help="run each architecture in its own process, in parallel; "
                        "append every row to this JSONL file")
    args = parser.parse_args()
    if args.out is None:
        return one(args)
    common = ["--variants", *args.variants, "--lengths", *map(str, args.lengths), "--max-sequences",
              str(args.max_sequences), "--prefill-tokens", str(args.prefill_tokens), "--json",
              *(["--no-fast-math"] if args.no_fast_math else [])]
    processes = {kind: subprocess.Popen([sys.executable, __file__, "--archs", kind, *common], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env={**os.environ})
                 for kind in args.archs}
    failed = 0
    with open(args.out, "a") as out:
        for kind, process in processes.items():
            text, _ = process.communicate()
            result = [line for line in text.splitlines() if line.startswith("RESULT ")]
            if process.returncode != 0 or not result:
                failed += 1
                print(f"{kind}: exit {process.returncode}\n{text[-3000:]}", flush=True)
                out.write(json.dumps({"arch": kind, "error": f"exit {process.returncode}", "log_tail": text[-2000:]})
                          + "\n")
                continue
            for row in json.loads(result[-1][len("RESULT "):]):
                row["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
                out.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    raise SystemExit(main())
