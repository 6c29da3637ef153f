"""creditaudit: train networks with backprop and its alternatives, and audit their credit assignment."""
__version__ = "0.1.0"
