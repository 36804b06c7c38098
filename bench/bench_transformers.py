"""A transformers causal LM loaded lazily by torchpool against transformers' own from_pretrained.

    python bench/bench_transformers.py                  # ~340 MB bf16 Llama (random weights) in 4 shards
    python bench/bench_transformers.py --layers 16 --dir /data/bench_hf

The model is made once by this script (random weights, `save_pretrained(max_shard_size=...)`, kept in
--dir for later runs). Each variant runs in a fresh Python process with the page cache of the shards
dropped first (`echo 3 > /proc/sys/vm/drop_caches` as root, else fsync + posix_fadvise(DONTNEED), as
bench/bench_checkpoint.py does), after `import torch, transformers, torchpool` (not timed):

- time to the first generated token: from the load call to `generate(max_new_tokens=1)` returning
  (transformers reads every weight first; torchpool reads each module's weights as it runs);
- peak RSS (VmHWM) of the process, and peak anonymous / file-backed RSS sampled every 5 ms;
- tokens/s: `generate(max_new_tokens=N)` after the first token (greedy), so steady-state decoding;
- with a budget of a quarter of the weights: the same for torchpool's LRU budget (Note [LRU budget]).

Every variant must produce the same tokens as transformers (checked; a difference fails the run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_checkpoint import Sampler, drop_caches, resident  # noqa: E402

PROMPT = [1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203, 29889, 306, 1074, 2289, 9826]


def generate_model(directory: Path, layers: int, hidden: int, inter: int, vocab: int) -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    marker = directory / "bench.json"
    spec = dict(layers=layers, hidden=hidden, inter=inter, vocab=vocab)
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256, tie_word_embeddings=False,
                      max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(directory, max_shard_size=f"{max(1, total // 4 // 2**20 + 1)}MB")
    marker.write_text(json.dumps(spec))
    return directory


def shard_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


# ---------------------------------------------------------------- one variant, in a fresh process
def run_variant(variant: str, directory: Path, budget: int, new_tokens: int) -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    import torchpool
    import torchpool.lazy

    transformers.logging.set_verbosity_error()
    ids = torch.tensor([PROMPT])
    # transformers imports each model's modules on first use (seconds here): done before timing, so
    # both sides are timed for loading and generating only
    from transformers import AutoConfig
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(directory))]
    get_checkpoint_conversion_mapping("llama")
    import transformers.generation.utils  # noqa: F401
    base = Sampler.status()
    sampler = Sampler()
    t0 = time.perf_counter()
    if variant == "transformers":
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
    elif variant == "torchpool":
        model = torchpool.from_pretrained(AutoModelForCausalLM, directory)
    elif variant == "torchpool_budget":
        model = torchpool.from_pretrained(AutoModelForCausalLM, directory, budget_bytes=budget)
    else:
        raise SystemExit(f"unknown variant {variant}")
    t_usable = time.perf_counter() - t0
    first = model.generate(ids, max_new_tokens=1, do_sample=False)
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    gen_s = time.perf_counter() - t1
    mem = sampler.stop()
    res = dict(variant=variant, usable_s=t_usable, ttft_s=ttft, gen_s=gen_s, new_tokens=new_tokens,
               tokens_per_s=new_tokens / gen_s, tokens=out[0].tolist(), first=first[0, -1].item(),
               base_rss=base["VmRSS"], **mem)
    if variant.startswith("torchpool"):
        s = torchpool.lazy.stats(model)
        res.update(peak_resident=s["peak_resident_bytes"], evictions=s["evictions"], loads=s["loads"],
                   bytes_loaded=s["bytes_loaded"])
    return res


def child(variant: str, directory: Path, budget: int, new_tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--variant", variant, "--dir", str(directory), "--budget", str(budget),
           "--new-tokens", str(new_tokens)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"variant {variant} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/torchpool_bench_hf"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each variant (interleaved)")
    ap.add_argument("--budget", type=int, default=0, help="budget in bytes (default: a quarter of the weights)")
    ap.add_argument("--variant")
    a = ap.parse_args()
    if a.variant:
        print(json.dumps(run_variant(a.variant, a.dir, a.budget, a.new_tokens)))
        return
    directory = generate_model(a.dir, a.layers, a.hidden, a.inter, a.vocab)
    files = shard_files(directory)
    size = sum(p.stat().st_size for p in files)
    budget = a.budget or size // 4
    print(f"model: {directory} ({len(files)} shards, {size / 1e6:.0f} MB bf16, {a.layers} layers, hidden {a.hidden}); "
          f"budget {budget / 2**20:.0f} MiB (a quarter); {a.new_tokens} new tokens; {os.cpu_count()} cores")
    variants = ["transformers", "torchpool", "torchpool_budget"]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    method = None
    for _ in range(a.repeats):
        for v in variants:  # interleaved, each cold
            method = drop_caches(files)
            frac = resident(files)
            r = child(v, directory, budget, a.new_tokens)
            r["resident_before"] = frac
            runs[v].append(r)
    ref_tokens = runs["transformers"][0]["tokens"]
    for v in variants:
        for r in runs[v]:
            if r["tokens"] != ref_tokens:
                raise SystemExit(f"{v} generated other tokens than transformers: {r['tokens']} vs {ref_tokens}")
    mib = 2**20

    def med(v, k):
        xs = sorted(r[k] for r in runs[v])
        return xs[len(xs) // 2]

    print(f"cold = {method}; every variant generated the same tokens\n")
    print("| variant | usable s | first token s | peak RSS MiB | above baseline MiB | peak anon MiB | peak file MiB | "
          "tokens/s | notes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for v in variants:
        r = runs[v][len(runs[v]) // 2]
        notes = [f"baseline RSS {r['base_rss'] / mib:.0f} MiB", f"resident before {r['resident_before']:.0%}"]
        if "peak_resident" in r:
            notes.append(f"peak resident weights {r['peak_resident'] / mib:.0f} MiB, {r['evictions']} evictions")
        if a.repeats > 1:
            notes.append("first token s: " + "/".join(f"{x['ttft_s']:.2f}" for x in runs[v]))
        above = med(v, 'peak_rss') - r['base_rss']
        print(f"| {v} | {med(v, 'usable_s'):.3f} | {med(v, 'ttft_s'):.2f} | {med(v, 'peak_rss') / mib:.0f} | "
              f"{above / mib:.0f} | "
              f"{med(v, 'peak_anon') / mib:.0f} | {med(v, 'peak_file') / mib:.0f} | {med(v, 'tokens_per_s'):.1f} | "
              f"{'; '.join(notes)} |")
    hf = "transformers"
    print()
    print(f"first token: transformers / torchpool = {med(hf, 'ttft_s') / med('torchpool', 'ttft_s'):.2f}x, "
          f"transformers / torchpool(budget) = {med(hf, 'ttft_s') / med('torchpool_budget', 'ttft_s'):.2f}x")
    print(f"peak RSS: torchpool / transformers = {med('torchpool', 'peak_rss') / med(hf, 'peak_rss'):.2f}, "
          f"torchpool(budget) / transformers = {med('torchpool_budget', 'peak_rss') / med(hf, 'peak_rss'):.2f}")
    above = {v: med(v, "peak_rss") - runs[v][0]["base_rss"] for v in variants}
    print(f"peak RSS above the imports' baseline: torchpool / transformers = {above['torchpool'] / above[hf]:.2f}, "
          f"torchpool(budget) / transformers = {above['torchpool_budget'] / above[hf]:.2f}")
    print(f"tokens/s: torchpool / transformers = {med('torchpool', 'tokens_per_s') / med(hf, 'tokens_per_s'):.2f}, "
          f"torchpool(budget) / transformers = {med('torchpool_budget', 'tokens_per_s') / med(hf, 'tokens_per_s'):.2f}")


if __name__ == "__main__":
    main()
