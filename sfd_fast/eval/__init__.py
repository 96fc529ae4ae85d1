"""Did it forget, and what did it keep: classifier/CLIP metrics, FID, retention, attacks, the comparison."""
