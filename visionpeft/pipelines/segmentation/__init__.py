"""Remote-sensing semantic segmentation: encoders with adapters, smp decoders, macro
metrics from one confusion matrix, sliding-window inference (work in progress)."""
