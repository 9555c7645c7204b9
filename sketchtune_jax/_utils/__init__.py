"""Private helpers: atomic writes honouring the umask (`fileio`), progress bars and tables
(`reporting`), module paths inside an NNX tree (`module_paths`)."""
