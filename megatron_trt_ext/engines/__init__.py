"""Engine builds, in a process of their own. Only `engines.engine` imports tensorrt_llm."""
