"""Other unlearning methods for the comparison: plain SiD, ESD / retain-distill / AdvUnlearn, robust SFD."""
