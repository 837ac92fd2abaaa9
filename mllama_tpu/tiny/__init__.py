"""The bundled tiny Llama-3.2-Vision model: architecture, tokenizer, toy task, trainer, evaluation.

The model in assets/tiny-mllama is a real MllamaForConditionalGeneration, scaled down so that the
whole export -> compile -> engine chain can be tested on a CPU in minutes, and trained on a toy
visual question task so that "it answers correctly" is a meaningful end-to-end check.
"""
