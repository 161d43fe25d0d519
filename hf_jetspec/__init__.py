"""hf_jetspec: JetSpec tree speculative decoding as a native Transformers generation strategy.

`import hf_jetspec` hooks `generate()` so that `model.generate(..., assistant_model=head)` with a [`JetSpecHead`]
drafts a token tree per round and verifies it in one target forward. Output equals plain `generate()`.
"""

from transformers import AutoConfig, AutoModel

from .attention import register_tree_attention
from .chat import chat_input_ids
from .settings import TreeSettings, default_tree_budget
from .configuration_jetspec import JetSpecConfig, default_target_layer_ids, qwen3_draft_config, tokenizer_fingerprint
from .decoding import jetspec_decoding
from .stats import JetSpecGenerateStats
from .dflash_export import DFLASH_ATTENTION, dflash_incompatibility, export_dflash  # registers "jetspec_block_causal"
from .default_target import DEFAULT_TARGET_SHA256, default_target_path, load_default_target
from .integration import install
from .modeling_jetspec import JetSpecContextCache, JetSpecHead, draft_attention_mask
from .tree import DraftTree, build_tree, tree_from_parents
from .vllm_export import export_vllm, vllm_incompatibility

__version__ = "0.1.0"

install()
register_tree_attention()  # attn_implementation="jetspec_tree"
AutoConfig.register("jetspec", JetSpecConfig, exist_ok=True)
AutoModel.register(JetSpecConfig, JetSpecHead, exist_ok=True)

__all__ = [
    "DEFAULT_TARGET_SHA256",
    "DraftTree",
    "JetSpecConfig",
    "JetSpecContextCache",
    "JetSpecGenerateStats",
    "JetSpecHead",
    "build_tree",
    "chat_input_ids",
    "default_target_layer_ids",
    "default_target_path",
    "TreeSettings",
    "default_tree_budget",
    "draft_attention_mask",
    "jetspec_decoding",
    "load_default_target",
    "qwen3_draft_config",
    "tokenizer_fingerprint",
    "tree_from_parents",
    "export_vllm",
    "vllm_incompatibility",
]
