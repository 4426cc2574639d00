"""The whole stock protocol: Lua scripts in lua/, the Python that calls them, the loader's SQL."""
