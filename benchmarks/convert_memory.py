"""Peak memory (RSS) and wall time of HF -> run dir -> HF conversion, relative to checkpoint size.

    python benchmarks/convert_memory.py                  # ~0.89B params (bf16, 1.77 GB), TP=2
    python benchmarks/convert_memory.py --tp 1           # one process (the import holds the whole model)

Three launches: `create` writes a synthetic Llama-shaped HF checkpoint (random bf16
weights, ~1 GB safetensors files + index, a small BPE tokenizer) into --workdir,
tensor by tensor; then `import` (from_hf -> run dir) and `export` (run dir -> HF)
each run under torchrun (TP x PP gloo processes on CPU) in fresh processes. Each
rank reports its peak RSS (VmHWM, reset after start-up through /proc/self/clear_refs)
and its RSS before converting (imports done), so "peak - start" is what conversion
costs. The last stdout line is a JSON summary: per direction, seconds and the worst
rank's peak - start, also as a fraction of the checkpoint's size on disk.

Last run at the defaults (2-core shared CPU, load 10-18): import 0.904 GiB = 0.548x
(13.5 s), export 0.311 GiB = 0.189x (27.6 s), bit-exact.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-mb", type=int, default=1000, help="size of the synthetic and exported files")
    p.add_argument("--workdir", default="/tmp/minitron_convert_bench")
    p.add_argument("--phase", choices=["import", "export"], default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _signature(a) -> str:
    return f"L{a.layers}_h{a.hidden}_f{a.ffn}_a{a.heads}_g{a.groups}_v{a.vocab}"


def _mem_gib(field: str) -> float:
    kib = int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))
    return kib / 2 ** 20


def create_hf(a, hf_dir: Path) -> None:
    """A LlamaForCausalLM directory written one tensor at a time (never the whole model in memory)."""
    import torch
    from safetensors.torch import save_file

    from minitron_megatron.config.model import ModelConfig
    from minitron_megatron.convert.families import LLAMA, hf_config_from_model
    from minitron_megatron.convert.hf_io import finalize_shards
    from minitron_megatron.convert.tensor_map import expected_hf_shapes

    cfg = ModelConfig(name="bench", num_layers=a.layers, hidden_size=a.hidden, ffn_hidden_size=a.ffn,
                      num_attention_heads=a.heads, num_query_groups=a.groups, kv_channels=a.hidden // a.heads,
                      max_position_embeddings=4096, vocab_size=a.vocab, params_dtype="bfloat16")
    tmp = hf_dir.parent / f".{hf_dir.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    files, pending, size = [], {}, 0
    for name, shape in expected_hf_shapes(cfg, LLAMA).items():
        pending[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        size += pending[name].numel() * 2
        if size >= a.shard_mb * 2 ** 20:
            files.append(_flush(tmp, len(files), pending, size, save_file))
            pending, size = {}, 0
    if pending:
        files.append(_flush(tmp, len(files), pending, size, save_file))
    finalize_shards(tmp, files)
    _write_tokenizer(tmp)
    config = hf_config_from_model(cfg, LLAMA, bos_token_id=1, eos_token_id=2)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(hf_dir, ignore_errors=True)
    tmp.rename(hf_dir)


def _flush(out: Path, i: int, tensors: dict, size: int, save_file):
    name = f"part-{i:05d}.safetensors"
    save_file(tensors, str(out / name), metadata={"format": "pt"})
    return name, list(tensors), size


def _write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = [p.read_text(errors="ignore") for p in sorted((ROOT / "minitron_megatron").rglob("*.py"))[:40]]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                           "tokenizer_class": "PreTrainedTokenizerFast"}))


def worker(a) -> None:
    from minitron_megatron.config.commands import ConvertCommand
    from minitron_megatron.config.convert import ConvertConfig
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.convert import convert
    from minitron_megatron.runtime import init_runtime

    ctx = init_runtime(tp=a.tp, pp=a.pp, device="cpu", seed=0)
    run = Path(a.workdir) / _signature(a)
    parallel = ParallelConfig(tp=a.tp, pp=a.pp)
    if a.phase == "import":
        cmd = ConvertCommand(from_hf=str(run / "hf"), save=str(run / "run"), parallel=parallel)
    else:
        cmd = ConvertCommand(load=str(run / "run"), to_hf=str(run / "out"), parallel=parallel,
                             convert=ConvertConfig(max_shard_size_mb=a.shard_mb))
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS (Linux >= 4.0)
    start_rss, start = _mem_gib("VmRSS"), time.time()
    summary = convert(cmd, ctx)
    result = {"seconds": time.time() - start, "start_rss_gib": start_rss, "peak_rss_gib": _mem_gib("VmHWM"),
              "summary": summary}
    (run / f"{a.phase}-rank{ctx.rank}.json").write_text(json.dumps(result))


def _launch(a, phase: str) -> None:
    args = [x for x in sys.argv[1:] if not x.startswith("--phase")] + [f"--phase={phase}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={a.tp * a.pp}",
           f"--master-port={_free_port()}", str(Path(__file__).resolve()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, check=True, env=env)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def report(a, ckpt_bytes: int) -> dict:
    run = Path(a.workdir) / _signature(a)
    out = {"model": _signature(a), "tp": a.tp, "pp": a.pp, "checkpoint_gib": round(ckpt_bytes / 2 ** 30, 3)}
    for phase in ("import", "export"):
        ranks = [json.loads(p.read_text()) for p in sorted(run.glob(f"{phase}-rank*.json"))]
        cost = max(r["peak_rss_gib"] - r["start_rss_gib"] for r in ranks)
        out[phase] = {"seconds": round(max(r["seconds"] for r in ranks), 2),
                      "peak_rss_gib": round(max(r["peak_rss_gib"] for r in ranks), 3),
                      "peak_over_start_gib": round(cost, 3),
                      "peak_over_start_per_checkpoint": round(cost * 2 ** 30 / ckpt_bytes, 3)}
    out["params"] = json.loads((run / "import-rank0.json").read_text())["summary"]["params"]
    return out


def same_tensors(a_dir: Path, b_dir: Path) -> bool:
    """Every tensor of b equals a's bit for bit (compared one at a time)."""
    import torch
    from safetensors import safe_open

    maps = [json.loads((d / "model.safetensors.index.json").read_text())["weight_map"] for d in (a_dir, b_dir)]
    if sorted(maps[0]) != sorted(maps[1]):
        return False
    for name, file in maps[0].items():
        with safe_open(str(a_dir / file), "pt") as fa, safe_open(str(b_dir / maps[1][name]), "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            if x.dtype != y.dtype or not torch.equal(x, y):
                return False
    return True


def main() -> None:
    a = parse_args()
    if a.phase is not None:
        worker(a)
        return
    run = Path(a.workdir) / _signature(a)
    if not (run / "hf" / "config.json").is_file():
        sys.path.insert(0, str(ROOT))
        started = time.time()
        create_hf(a, run / "hf")
        print(f"created {run / 'hf'} in {time.time() - started:.1f} s", flush=True)
    for stale in ("run", "out"):
        shutil.rmtree(run / stale, ignore_errors=True)
    for stale in run.glob("*-rank*.json"):
        stale.unlink()
    ckpt_bytes = sum(p.stat().st_size for p in (run / "hf").glob("*.safetensors"))
    _launch(a, "import")
    _launch(a, "export")
    out = report(a, ckpt_bytes)
    out["bit_exact"] = same_tensors(run / "hf", run / "out")
    print(f"checkpoint {out['checkpoint_gib']} GiB on disk; {a.tp * a.pp} ranks (max over ranks)")
    for phase in ("import", "export"):
        r = out[phase]
        print(f"{phase:<7} {r['seconds']:>8.2f} s  peak RSS {r['peak_rss_gib']:.3f} GiB  "
              f"peak - start {r['peak_over_start_gib']:.3f} GiB = "
              f"{r['peak_over_start_per_checkpoint']:.3f} x checkpoint")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
