"""LongRoPE2 on Llama-3 8B: 8k -> 128k (16x), needle-searched factors, mixed context window training.

Slice: TPU v5p-256 (128 chips): fsdp 4 x seq 32.

LongRoPE2 (arXiv 2502.20082) trains with a mixed context window: rows of 131072 tokens pack many
documents (`pack="concat"`, document masking through segment ids, positions restarting per piece),
and each document takes LongRoPE's short factors when its own length is <= the original 8192 and
the long factors otherwise (`rope.mixed_window`). Short documents thus keep the pre-trained RoPE
while long ones learn the rescaled one, in the same row.

Hyper-parameters from microsoft/nnscaler examples/longrope2 (commit 1585c15d), the released
LongRoPE2 training of this model: `train.py` (AdamW lr 2e-5, betas 0.9/0.95, no weight decay,
grad clip 1.0, bf16, 40 warmup steps then cosine to 0), `run.sh` / `README.rst` (2250 steps,
grad accumulation 16 x micro-batch 1 x 2 data-parallel groups = 32 rows per step), `data/process.py`
(rows of 128k tokens; the mix: 32000 rows of fineweb-edu documents of at most 8k tokens and 40000
rows of RedPajama-1T arxiv / common_crawl / wikipedia documents of 8k-200k tokens cut at 128k, so
44% short and 56% long tokens; 72000 rows = one epoch of 2250 x 32 rows, 9.4B tokens). nnscaler
picks the factors per row (max position of the row: its rows hold only short or only long
documents); here each document picks its own, so a mixed corpus needs no such split. A document
cut at the end of a row goes on as a new piece of the next row (positions from 0), and a piece of
<= 8192 tokens takes the short factors; nnscaler drops the rest of a cut document instead.

Data: `files:data/longrope2_mix/{split}/*.jsonl`, one document per line (`text`), built as in
nnscaler's `data/process.py` (fineweb-edu sample-10BT <= 8k tokens, RedPajama long documents),
both kinds in the same files; the loader shuffles documents. The training split must hold about
9.4B tokens for one epoch.

Factors: `factors/llama3_8b_longrope2_128k.json` is LongRoPE2's search output,
`longrope-jax search --model hf:checkpoints/Meta-Llama-3-8B --target-length 131072 --original-length 8192
--space longrope2 --objective needle --out runs/l2_search`, copied from `runs/l2_search/rope_scaling.json`
(or nnscaler's published factors, `examples/longrope2/llama3_8b_longrope2_config.json`, short factors
all 1.0). `longrope-jax compile` does not need it (it compiles with PI-like factors of the same shape).
"""

from longrope_jax.train.config import long_context_finetune


def get_config():
    c = long_context_finetune(arch="llama3-8b", init_from="hf:checkpoints/Meta-Llama-3-8B",
                              seq_len=131072, steps=2250, lr=2e-5, warmup_steps=40,
                              batch_size=32, mesh=dict(data=1, fsdp=4, seq=32, tensor=1))
    c.optimizer.update(schedule="cosine", end_lr_ratio=0.0)
    c.rope.update(type="longrope", original_max_position_embeddings=8192,
                  factors_file="factors/llama3_8b_longrope2_128k.json", mixed_window=True)
    # Many documents per row, each its own segment; no minimum length (short documents are the point).
    c.data.update(source="files:data/longrope2_mix/{split}/*.jsonl", pack="concat", min_doc_tokens=0)
    c.checkpoint.update(every_steps=200)
    return c
