"""config.json of a model whose switches no transformers model computes (the `speedrun` preset, or any mix of
--arch_option switches): the repository's GPTConfig, field by field, under `gpt`.

Written into the directory by export_hf.py, with modeling_rented_gpt.py and a copy of the repository's model.py;
transformers runs it with trust_remote_code=True.
"""
from transformers import PretrainedConfig


class RentedGPTConfig(PretrainedConfig):
    model_type = "gpt2_rented_gpu"  # the repository's name (gpt2-rented-gpu), so the Hub says where it came from

    def __init__(self, gpt=None, **kwargs):
        self.gpt = dict(gpt or {})  # model.py's GPTConfig.to_dict()
        super().__init__(**kwargs)
