"""Reference logits recorded at export time (the probe) and their check (`megatron-trt-ext verify`)."""
