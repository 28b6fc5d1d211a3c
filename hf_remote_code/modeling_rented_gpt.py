"""The repository's GPT as a transformers model, for the configs GPT-2, Llama and Qwen3 cannot compute: model.py
(copied beside this file by export_hf.py) computes the logits, so they are the training forward's by
construction. AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True) builds it; generate() works,
without a KV cache (each new token runs the whole sequence again; sample.py keeps one).
"""
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_rented_gpt import RentedGPTConfig
from .model import GPT, GPTConfig


class RentedGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = RentedGPTConfig
    base_model_prefix = "gpt"
    # Only where config.tie_word_embeddings: the file then holds the token table once, and the head is tied to it.
    _tied_weights_keys = {"gpt.lm_head.weight": "gpt.transformer.wte.weight"}

    def __init__(self, config: RentedGPTConfig):
        super().__init__(config)
        self.gpt = GPT(GPTConfig.from_dict(config.gpt))
        self.post_init()

    def _init_weights(self, module):
        """Nothing: GPT initialises its own weights as it trains them, and from_pretrained loads every one."""

    def get_input_embeddings(self):
        return self.gpt.transformer.wte

    def get_output_embeddings(self):
        return self.gpt.lm_head

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs) -> CausalLMOutput:
        """Logits over the vocabulary (B, T, vocab_size), soft-capped as trained; with labels (the input ids,
        -100 ignored, shifted here as transformers' causal LMs do) their mean cross-entropy too."""
        if attention_mask is not None and not bool(attention_mask.all()):
            # Documents in one row are separated by <|endoftext|> (the model's document mask), not by padding.
            raise ValueError("this model takes no padding: pass rows of one length, or one row at a time")
        logits, _ = self.gpt(input_ids)
        logits = logits[..., :self.config.vocab_size]  # the padding rows are never produced
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs) -> dict:
        """The whole sequence at every step: the model keeps no transformers cache."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}
