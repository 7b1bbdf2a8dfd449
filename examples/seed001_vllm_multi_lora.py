# Seed 001's vLLM script (two self-identity LoRAs on one base, plus the base), run on loraplex.
# Changed from the original: the imports (vllm -> loraplex, plus two helpers that give offline paths) and the paths
# (the embedded SmolLM2 instead of Qwen2.5-7B-Instruct, the shipped demo adapters instead of the author's).
# Everything below the path block is the article's code.
from loraplex import LLM, SamplingParams
from loraplex.lora.request import LoRARequest
from loraplex.lora.demo import demo_adapters
from loraplex.models.loader import local_hf_dir
from transformers import AutoTokenizer

MODEL = "SmolLM2-135M-Instruct"
MODEL_DIR = local_hf_dir(MODEL)
LORA_V1 = str(demo_adapters()["congcong"])
LORA_V2 = str(demo_adapters()["benben"])

# 样例
prompts = ["你是谁?", "你是谁训练的?"]
# 设置生成所需参数
sampling_params = SamplingParams(temperature=0.7, top_p=0.8, top_k=50, max_tokens=2048)
lora_request1 = LoRARequest("self_adapter_v1", 1, lora_local_path=LORA_V1)
lora_request2 = LoRARequest("self_adapter_v2", 2, lora_local_path=LORA_V2)
# 创建模型
llm = LLM(model=MODEL, enable_lora=True, max_model_len=2048, dtype="float16")
tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
# 通过prompts构造prompt_token_ids
temp_prompts = [tokenizer.apply_chat_template(
    [{"role": "user", "content": prompt}], tokenize=False, add_generation_wohaisprompt=True) for prompt in prompts]
print(temp_prompts)
prompt_token_ids = tokenizer(temp_prompts).input_ids
# 注意,generate可以直接使用prompts,但直接使用prompts时,默认直接使用tokenizer.encode,没有拼接chat_template
print("加载自我认知Lora1进行模型推理:")
# 调用generate时,请求调用lora参数
outputs = llm.generate(sampling_params=sampling_params, prompt_token_ids=prompt_token_ids,
                       lora_request=lora_request1)
print(outputs)
# 输出结果
for i, (prompt, output) in enumerate(zip(prompts, outputs)):
    generated_text = output.outputs[0].text
    print("prompt: {}, output: {}".format(prompt, generated_text))
print("加载自我认知Lora2进行模型推理:")
# 调用generate时,请求调用lora参数
outputs = llm.generate(sampling_params=sampling_params, prompt_token_ids=prompt_token_ids,
                       lora_request=lora_request2)
print(outputs)
# 输出结果
for i, (prompt, output) in enumerate(zip(prompts, outputs)):
    generated_text = output.outputs[0].text
    print("prompt: {}, output: {}".format(prompt, generated_text))
print("不加载自我认知Lora进行模型推理:")
# 调用generate时,请求调用lora参数
outputs = llm.generate(sampling_params=sampling_params, prompt_token_ids=prompt_token_ids)
print(outputs)
# 输出结果
for i, (prompt, output) in enumerate(zip(prompts, outputs)):
    generated_text = output.outputs[0].text
    print("prompt: {}, output: {}".format(prompt, generated_text))
