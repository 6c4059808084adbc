"""Engine builds, in a process of their own. Only `build.engine` imports tensorrt_llm."""
