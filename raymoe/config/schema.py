"""Typed experiment config: one dataclass per component, mapping 1:1 onto the YAML files in tune_configs/.

Field comments give the meaning and the paper default. Cross-field rules live in `check_experiment`,
which raises ConfigError naming the field path and the bad value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DatasetName = Literal["mnist", "fashion_mnist", "cifar10", "cifar100", "text"]
GateKind = Literal["softmax", "attentive", "noisy_topk", "topk", "expert_choice"]
SPARSE_GATES = ("noisy_topk", "topk", "expert_choice")
DENSE_GATES = ("softmax", "attentive")
LM_ARCHS = ("gpt", "gpt_moe")  # causal language models on data.name text
TOKEN_MOE_ARCHS = ("vit_moe", "gpt_moe")  # token-level MoE layers (raymoe/moe/token)


@dataclass(kw_only=True, slots=True)
class TextDataConfig:
    """data.text: the token stream of a language model (data.name text); raymoe/data/text/."""

    source: Literal["corpus", "file", "bin", "hf"] = "corpus"  # corpus = Debian's fortunes (offline English)
    path: str | None = None  # corpus: fortunes folder (None = /usr/share/games/fortunes); file: .txt file or
    # folder of .txt files; bin: folder of train.bin/val.bin[/test.bin] + meta.json; hf: data_files/data_dir
    hf_name: str | None = None  # hf: datasets.load_dataset(path=...), a Hub id (online, or HF_HUB_OFFLINE=1 with
    # the local HF cache) or a local builder ("parquet", "json", "text") reading data.text.path
    hf_config: str | None = None  # hf: load_dataset(name=...)
    hf_text_field: str = "text"  # hf: the column holding the documents
    tokenizer: Literal["byte", "bpe"] = "byte"  # byte: 256 ids, no files; bpe: ByteLevel BPE trained on train
    # (bin: the shards' ids are used as they are; tokenizer and vocab_size are not read)
    vocab_size: int = 2048  # bpe target vocabulary (byte: always 256; bin: meta.json's)
    block_size: int = 128  # context window of the samples (<= model.gpt.block_size)
    val_tokens: int = 32768  # size of the fixed validation subset (evenly spaced windows of the val split)


@dataclass(kw_only=True, slots=True)
class DataConfig:
    name: DatasetName = "fashion_mnist"
    root: str | None = None  # first place to look for (and download into) the files; None = ./data
    train_limit: int | None = None  # first N training samples only (quick runs); text: first N tokens
    test_limit: int | None = None  # first N test samples only; text: first N tokens
    augment: bool | None = None  # flip + reflect-pad-4 crop on whole batches; None = on for cifar100 only (paper)
    # image data: share of the training set held out for validation (stratified by class, fixed draw, never the
    # test set); null = the paper's protocol, train on all of it (docs/methodology.md). Text: data.text's val split.
    val_fraction: float | None = 0.1
    download: bool = True  # last resort after data.root and the system copy
    text: TextDataConfig = field(default_factory=TextDataConfig)  # data.name text only


@dataclass(kw_only=True, slots=True)
class ViTConfig:
    patch_size: int = 4  # 28x28 -> 7x7 patches, 32x32 -> 8x8
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_dim: int = 128  # d_ff of the dense FFN and of each expert
    moe_every: int = 2  # MoE FFN in every other block (V-MoE); blocks i % moe_every == moe_every - 1
    pool: Literal["cls", "mean"] = "cls"
    num_shared_experts: int = 0  # DeepSeekMoE always-on experts
    causal: bool = False  # only to exercise routers that refuse causal models (expert choice)


@dataclass(kw_only=True, slots=True)
class GPTConfig:
    """model.gpt: the decoder-only LM of arch gpt (dense) and gpt_moe (raymoe/models/gpt.py)."""

    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_dim: int = 512  # d_ff of each expert and of the dense FFN of non-MoE blocks
    # arch gpt widens the FFN of the would-be MoE blocks to (gate.top_k + num_shared_experts) * mlp_dim, so
    # dense and MoE have the same active expert parameters per token (one --set model.arch apart)
    moe_every: int = 2  # MoE FFN in blocks i % moe_every == moe_every - 1 (as model.vit)
    num_shared_experts: int = 0  # DeepSeekMoE always-on experts of width mlp_dim
    positions: Literal["rope", "learned"] = "rope"
    block_size: int = 256  # max context: learned position rows / RoPE table
    dropout: float = 0.0  # embeddings, attention probabilities, residual branches (nanoGPT)
    vocab_size: int | None = None  # embedding rows; None = the data's vocabulary (pad up for speed, e.g. 50304)


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    # moe = the paper's expectation MoE; gpt / gpt_moe = the causal language models on data.name text
    arch: Literal["moe", "single", "vit_moe", "gpt", "gpt_moe"] = "moe"
    num_experts: int = 5
    hidden_size: int | None = None  # expert fc2 width = attention H; None = the dataset's paper value (32 / 64)
    output_softmax: bool = False  # extra softmax over the mixture (reference code from 2022-11-18, CIFAR-100)
    log_eps: float = 1e-7  # L_CE = -log(y_hat + eps); master uses 1e-15
    vit: ViTConfig = field(default_factory=ViTConfig)
    gpt: GPTConfig = field(default_factory=GPTConfig)


@dataclass(kw_only=True, slots=True)
class HyperMoEConfig:
    enabled: bool = False
    expert_embed_dim: int = 128  # per-layer expert embeddings (Zhao et al. code defaults)
    process_dim: int = 128
    hypernet_input: int = 128
    hypernet_bottleneck: int = 128
    layer_embed_dim: int = 10
    adapter_dim: int = 64  # bottleneck b of the generated HyperExpert


@dataclass(kw_only=True, slots=True)
class GateConfig:
    kind: GateKind = "softmax"
    temperature: float = 1.0  # original gate softmax(W h / T); T = 1 in every paper experiment
    top_k: int = 1
    renormalize: bool | None = None  # renormalise top-k weights to sum 1; None = only when top_k > 1 (GShard)
    noise_eps: float = 1e-2  # noisy top-k: std = softplus(x W_noise) + eps (Hyper_MoE code)
    jitter: float = 0.0  # Switch multiplicative input jitter in training
    capacity_factor: float | None = None  # token routers: capacity = ceil(cf * tokens * k / E); None = dropless
    bias_balance_rate: float = 0.0  # aux-loss-free balancing (DeepSeek-V3) update rate u; 0 = off
    hypermoe: HyperMoEConfig = field(default_factory=HyperMoEConfig)


@dataclass(kw_only=True, slots=True)
class SampleSimilarityConfig:
    beta_s: float = 0.0  # weight of the same-expert distance term S
    beta_d: float = 0.0  # weight of the different-expert distance term D
    normalization: Literal["reference", "normalized"] = "reference"  # reference: beta_s*S - beta_d*D/N^2 (as coded)
    distance: Literal["raw", "raw_channel_sum"] = "raw"  # pixel distance; channel_sum = AAAI-submission code


@dataclass(kw_only=True, slots=True)
class RegularizerConfig:
    importance: float = 0.0  # w * CV(sum_n g(x_n))^2 (Shazeer 2017; paper grid 0.2..1.0)
    load: float = 0.0  # w * CV(load)^2 with the noisy top-k smooth load (Shazeer 2017)
    load_balance: float = 0.0  # Switch alpha * E * sum_e f_e P_e
    z_loss: float = 0.0  # ST-MoE router z-loss coefficient
    sample_similarity: SampleSimilarityConfig = field(default_factory=SampleSimilarityConfig)


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 512
    eval_batch_size: int = 1024  # metrics cover the whole set regardless; FMNIST eval took 0.34 s at 1024, 0.51 at 2048
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bn_eval: bool = True  # False = reference quirk: BatchNorm keeps batch statistics at test time
    # train_error from each step's own forward (free), or the reference's extra no-grad pass after each optimizer
    # step (docs/paper-notes.md §4.1: lower, since it sees the updated weights; one more forward per step)
    count_train_error: Literal["step", "after_step"] = "step"
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast on CPU/CUDA, float32 master weights
    grad_clip: float | None = None  # clip by the global gradient norm; None = off (LM presets: 1.0)
    accum_steps: int = 1  # gradient accumulation: micro-batches per optimizer step (must divide batch_size)
    schedule: Literal["constant", "cosine"] = "constant"  # lr after warm-up; cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0  # linear warm-up from lr / warmup_steps
    min_lr_ratio: float = 0.1
    # Step budget (language models): train max_steps optimizer steps (or `tokens` / tokens per step), evaluating
    # and checkpointing every eval_every steps; image models keep `epochs`.
    max_steps: int | None = None
    tokens: int | None = None
    eval_every: int = 200
    distill_from: str | None = None  # checkpoint of a trained attentive MoE: freeze experts, train a new original gate
    checkpoint_dir: str = "checkpoints"
    progress: bool = True


@dataclass(kw_only=True, slots=True)
class ScalingConfig:
    num_workers: int = 0  # 0 = this process; >= 1 = Ray Train TorchTrainer workers
    use_gpu: bool = False
    expert_parallel: int = 1  # EP degree: experts split across this many ranks
    max_failures: int = 0  # Ray Train FailureConfig(max_failures)
    storage_path: str | None = None  # Ray Train storage; None = ./ray_results (use shared storage on clusters)
    cpus_per_worker: float = 1.0  # Ray resources_per_worker CPU (raymoe tune sets it from the sweep's resources)
    gpus_per_worker: float | None = None  # with use_gpu; a fraction packs small runs on one GPU; None = 1


@dataclass(kw_only=True, slots=True)
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"  # MLflow >= 3.13 refuses the ./mlruns file store
    experiment: str = "raymoe"
    enabled: bool = True
    log_model: bool = True  # the final model with mlflow.pytorch (one process, or data-parallel workers)
    system_metrics_s: float | None = 10.0  # CPU, memory, GPU sampled every N seconds (MLflow's monitor); null = off


@dataclass(kw_only=True, slots=True)
class ExperimentConfig:
    name: str
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
