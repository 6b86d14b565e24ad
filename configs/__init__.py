"""Named configs shipped with the package (`embedcache configs` lists them; `--config NAME` loads one)."""
