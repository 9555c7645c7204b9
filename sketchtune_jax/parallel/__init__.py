"""Running on many devices and hosts: meshes and shardings (`sharding`), runs of several
processes (`distributed`)."""
