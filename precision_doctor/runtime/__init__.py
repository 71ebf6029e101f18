"""The runtime stage: how this process takes part in a torch.distributed job (`runtime.distributed`)."""
