"""Adaptation: a backbone + head + loss = one task nn.Module, tuned by LoRA, full fine-tuning or a linear probe."""
