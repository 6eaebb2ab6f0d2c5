"""Performance measurements for maintainers: step time and cache memory, with the results the bundle READMEs quote."""
