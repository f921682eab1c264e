"""robuq's ground floor: pure maths, file formats and runtime helpers that every other layer builds on."""
