"""Stand-in: ComfyUI's core imports torchvision.transforms but the SD models never call it."""
