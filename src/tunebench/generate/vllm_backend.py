"""Optional vLLM backend: the same contract as the transformers engine (answers in input order).

vLLM is an optional extra (`pip install 'tunebench[vllm]'`, Linux + CUDA). LoRA adapters of a run
are served through vLLM's LoRA support; prompts are the same token ids training used.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunebench.config import GenerateConfig
from tunebench.errors import ModelError
from tunebench.generate.engine import Answer, clean_answer, stop_strings_for
from tunebench.runs import TRAINED_META
from tunebench.train.methods import get_method


class VllmGenerator:
    def __init__(self, target: str, config: GenerateConfig, template: str | None):
        try:
            from vllm import LLM
        except ImportError as exc:
            raise ModelError("generate.backend vllm needs vLLM: pip install 'tunebench[vllm]' "
                             "(Linux with a CUDA GPU), or use backend: transformers") from exc
        from tunebench.models.tokenizer import resolve_model_path
        from tunebench.models.trained import find_trained, pick_template

        trained = find_trained(Path(target))
        self.lora = None
        base = target
        run_template = None
        if trained is not None:
            meta = json.loads((trained / TRAINED_META).read_text(encoding="utf-8"))
            run_template = meta.get("template")
            if (trained / "adapter_config.json").exists():
                if not get_method(meta["method"]).lora:
                    raise ModelError("vLLM serves LoRA adapters only; merge is impossible for prefix/prompt tuning")
                from vllm.lora.request import LoRARequest

                base = meta["base_model"]
                self.lora = LoRARequest("run", 1, str(trained))
            else:
                base = str(trained)
        self.llm = LLM(model=resolve_model_path(base), enable_lora=self.lora is not None)
        self.tokenizer = self.llm.get_tokenizer()
        self.template = pick_template(run_template, template, self.tokenizer)
        self.config = config
        self.stops = stop_strings_for(config, self.template)

    def generate(self, items, on_answer=None, progress=None) -> list[Answer]:
        from vllm import SamplingParams

        from tunebench.data.tokens import encode_prompt

        c = self.config
        params = SamplingParams(max_tokens=c.max_new_tokens, temperature=c.temperature if c.do_sample else 0.0,
                                top_p=c.top_p, top_k=c.top_k or -1, repetition_penalty=c.repetition_penalty,
                                stop=self.stops or None)
        prompts = [{"prompt_token_ids": encode_prompt(m, self.template, self.tokenizer)} for m in items]
        outputs = self.llm.generate(prompts, params, lora_request=self.lora)
        answers = []
        for i, out in enumerate(outputs):
            text, _ = clean_answer(out.outputs[0].text, self.stops)
            answer = Answer(i, text, len(out.outputs[0].token_ids), out.outputs[0].finish_reason == "stop")
            answers.append(answer)
            if on_answer:
                on_answer(answer)
            if progress is not None:
                progress.update(1)
        return answers
