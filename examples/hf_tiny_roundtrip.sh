#!/usr/bin/env bash
# HF -> prune -> distill -> HF on a tiny random Llama, on CPU: the Llama-3.1-8B -> 4B recipe in
# miniature (README: "Hugging Face in and out"). Everything is made here; nothing is downloaded.
#   bash examples/hf_tiny_roundtrip.sh [WORK_DIR]       (default: runs/hf_tiny)
# Env: PYTHON (default python), NPROC (default 2: TP=2 over gloo).
set -euo pipefail
W=${1:-runs/hf_tiny}
PY=${PYTHON:-python}
NPROC=${NPROC:-2}
export MINITRON_NO_PROGRESS=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
rm -rf "$W" && mkdir -p "$W"
launch() { "$PY" -m torch.distributed.run --nproc-per-node "$NPROC" --master-port "${PORT:-29533}" -m "$@"; }

# 1. A tiny random Llama-3.1-style model (llama3 RoPE scaling, GQA, head_dim 16 != 64/8) and a
#    BPE tokenizer, saved by transformers, plus a jsonl corpus (this machine's stdlib sources).
"$PY" - "$W" <<'PYEOF'
import json, pathlib, sys, sysconfig
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

w = pathlib.Path(sys.argv[1])
src = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]
docs = [p.read_text(errors="ignore")[:4000] for p in src]
(w / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"],
                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
config = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=16, rope_theta=500000.0,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                     max_position_embeddings=131072, bos_token_id=1, eos_token_id=2)
torch.manual_seed(0)
LlamaForCausalLM(config).save_pretrained(w / "hf_teacher")
fast.save_pretrained(w / "hf_teacher")
print("made", w / "hf_teacher")
PYEOF

# 2. HF -> run dir, at TP=2 (each rank reads only its slices).
launch minitron_megatron.convert from_hf="$W/hf_teacher" save="$W/teacher" parallel.tp=2 seq_length=128

# 3. The corpus as a Megatron indexed dataset, tokenized with the imported HF tokenizer.
"$PY" -m minitron_megatron.data.preprocess --input "$W/docs.jsonl" \
  --tokenizer-model "$W/teacher/tokenizer.model" --output-prefix "$W/docs_text_document"
DATA=(data=custom data.tokenizer_model="$W/teacher/tokenizer.model" "data.train_prefixes=[$W/docs_text_document]"
      "data.split='90,10,0'" device=cpu parallel.tp=2)

# 4. Importance + prune at TP=2: hidden 64 -> 48, 8 -> 4 heads, 4 -> 2 query groups, ffn 192 -> 128
#    (head_dim stays 16, so 16 != 48/4 as in Minitron-4B).
launch minitron_megatron.prune load="$W/teacher" save="$W/pruned" "${DATA[@]}" \
  prune.target.hidden_size=48 prune.target.num_attention_heads=4 prune.target.num_query_groups=2 \
  prune.target.ffn_hidden_size=128 prune.importance.calibration_samples=16 \
  evaluate.samples=16 evaluate.micro_batch_size=4

# 5. Distill the pruned student from the imported teacher.
launch minitron_megatron.distill teacher.load="$W/teacher" student.load="$W/pruned" save="$W/student" "${DATA[@]}" \
  distill.steps=20 distill.micro_batch_size=4 distill.global_batch_size=8 distill.optim.warmup_steps=2 \
  distill.eval_interval=20 distill.eval_samples=16 distill.log_interval=5 distill.tensorboard=false \
  evaluate.samples=16 evaluate.micro_batch_size=4

# 6. Run dir -> HF (sharded safetensors + index + tokenizer files).
launch minitron_megatron.convert load="$W/student" to_hf="$W/hf_student" parallel.tp=2

# 7. transformers loads it with no missing/unexpected keys and generates.
"$PY" - "$W/hf_student" <<'PYEOF'
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
model, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], output_loading_info=True)
assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
tok = AutoTokenizer.from_pretrained(sys.argv[1])
c = model.config
print(f"student: hidden {c.hidden_size}, heads {c.num_attention_heads}, groups {c.num_key_value_heads}, "
      f"head_dim {c.head_dim}, ffn {c.intermediate_size}, params {model.num_parameters()}")
ids = tok("def main():", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
print("generate:", repr(tok.decode(out[0])))
PYEOF
