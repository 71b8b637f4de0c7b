"""The sharpness probe of a trained adapter."""
