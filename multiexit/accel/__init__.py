"""Speed machinery beside the data's path: CUDA graphs, CUDA streams, distributed training."""
