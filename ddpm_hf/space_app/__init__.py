"""The Hub Space's app (app.py): a file that `ddpm-hf push --space` uploads as it is, and whose page `ddpm-hf demo` serves."""
