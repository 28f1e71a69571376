"""{INPUT}/{OUTPUT} prompt templates as Unsloth's notebooks write them, shared by the template tests."""

PROMPT_TEMPLATES = {
    # Unsloth's Ollama notebook
    "alpaca": (
        "Below are some instructions that describe some tasks. Write responses that appropriately complete each "
        "request.\n\n### Instruction:\n{INPUT}\n\n### Response:\n{OUTPUT}"),
    # the notebook's examples: a {SYSTEM} line, Llama 3 (with its BOS), ChatML
    "system-user-assistant": "{SYSTEM}\nUSER: {INPUT}\nASSISTANT: {OUTPUT}",
    "llama-3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|><|start_header_id|>user"
        "<|end_header_id|>\n\n{INPUT}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{OUTPUT}<|eot_id|>"),
    "chatml": ("<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{INPUT}<|im_end|>\n<|im_start|>assistant\n"
               "{OUTPUT}<|im_end|>"),
    "plain": "Q: {INPUT}\nA: {OUTPUT}",
}
