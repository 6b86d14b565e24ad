"""Student distillation from a store (issue 3): reads stores through ``embedcache.open_store`` and never
imports the teachers, so a student run cannot construct the teacher."""
