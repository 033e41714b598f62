"""The DeciLM / nemotron-nas configuration class that `shortrt export --to hf-heterogeneous` writes
beside a checkpoint as configuration_decilm.py (config.json's auto_map names it).

transformers loads it with `AutoConfig.from_pretrained(dir, trust_remote_code=True)`, and so does
vLLM, whose nemotron_nas model reads every block's settings as attributes
(`config.block_configs[i].attention.no_op`, `.ffn.ffn_mult`, ...): a plain dict would not do.
This file imports nothing from shortrt; it must work where only transformers is installed.
shortrt itself never imports it.
"""
from transformers import LlamaConfig


class SubblockConfig:
    """One sub-block's settings (a block's `attention` or `ffn`), each JSON key an attribute."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def __eq__(self, other) -> bool:
        return isinstance(other, SubblockConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"SubblockConfig({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"


class BlockConfig:
    """Block i of the model: `attention` and `ffn`, each no_op (absent), or present with its size."""

    def __init__(self, attention=None, ffn=None):
        self.attention = attention if isinstance(attention, SubblockConfig) else SubblockConfig(**(attention or {}))
        self.ffn = ffn if isinstance(ffn, SubblockConfig) else SubblockConfig(**(ffn or {}))

    def to_dict(self) -> dict:
        return {"attention": self.attention.to_dict(), "ffn": self.ffn.to_dict()}

    def __eq__(self, other) -> bool:
        return isinstance(other, BlockConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"BlockConfig(attention={self.attention!r}, ffn={self.ffn!r})"


class DeciLMConfig(LlamaConfig):
    """A Llama configuration whose blocks differ: KV heads (heads / n_heads_in_group) and MLP width
    (from ffn_mult) are per block, and a block may have no attention or no MLP at all.

    The top-level num_key_value_heads and intermediate_size that shortrt writes are those of every
    block that has attention / an MLP (NVIDIA's own class sets them to None, which transformers 5's
    typed configs refuse)."""

    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        super().__init__(**kwargs)
        blocks = [b if isinstance(b, BlockConfig) else BlockConfig(**b) for b in (block_configs or [])]
        if blocks and len(blocks) != self.num_hidden_layers:
            raise ValueError(f"block_configs has {len(blocks)} blocks but num_hidden_layers is "
                             f"{self.num_hidden_layers}")
        self.block_configs = blocks

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["block_configs"] = [b.to_dict() for b in self.block_configs]
        return out
