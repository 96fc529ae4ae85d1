"""Files in and out: atomic safetensors/JSON writes, PNG grids, the embedded data set."""
