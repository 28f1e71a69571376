"""A stand-in for Unsloth in the benchmark's tests. The suite does not install Unsloth: it pins
transformers <= 5.17 and trl <= 1.15, below the newest releases the suite runs on
(``make bench-unsloth`` measures the real one in a venv of its own).

It has the call signatures of Unsloth's ``FastLanguageModel.from_pretrained`` and
``get_peft_model`` (Unsloth 2026.8's GPU loader; no ``**kwargs``, so a misspelt keyword fails as it would there)
and does the work with unsloth_like's own. It is stricter than Unsloth about one thing: Unsloth
warns when transformers was imported before it (its patches then miss), this refuses, so a
benchmark process that imports in the wrong order fails its test.
"""

import sys

__version__ = "0+stand-in"

if "transformers" in sys.modules:
    raise ImportError("the unsloth stand-in must be imported before transformers, as Unsloth wants to be.")


class FastLanguageModel:
    @staticmethod
    def from_pretrained(model_name="unsloth/Llama-3.2-1B-Instruct", max_seq_length=2048, dtype=None,
                        load_in_4bit=True, load_in_8bit=False, load_in_16bit=False, full_finetuning=False,
                        token=None, device_map="sequential", rope_scaling=None, fix_tokenizer=True,
                        trust_remote_code=False, use_gradient_checkpointing="unsloth", resize_model_vocab=None,
                        revision=None, use_exact_model_name=False, random_state=3407):
        from unsloth_like import FastLanguageModel as Ours

        return Ours.from_pretrained(model_name, max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit,
                                    load_in_8bit=load_in_8bit, load_in_16bit=load_in_16bit,
                                    full_finetuning=full_finetuning, device_map="cpu",
                                    use_gradient_checkpointing=use_gradient_checkpointing)

    @staticmethod
    def get_peft_model(model, r=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"),
                       lora_alpha=16, lora_dropout=0.0, bias="none", layers_to_transform=None, layers_pattern=None,
                       finetune_last_n_layers=None, use_gradient_checkpointing="unsloth", random_state=3407,
                       max_seq_length=2048, use_rslora=False, modules_to_save=None, init_lora_weights=True,
                       loftq_config=None, temporary_location="_unsloth_temporary_saved_buffers", qat_scheme=None,
                       target_parameters=None, ensure_weight_tying=False):
        from unsloth_like import FastLanguageModel as Ours

        # A random state other than the benchmark's, so that only the copied adapters can make the
        # losses agree with the other variants'.
        return Ours.get_peft_model(model, r=r, target_modules=list(target_modules), lora_alpha=lora_alpha,
                                   lora_dropout=lora_dropout, bias=bias,
                                   use_gradient_checkpointing=use_gradient_checkpointing,
                                   random_state=random_state + 1)
