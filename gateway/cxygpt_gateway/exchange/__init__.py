"""The port where one request is read and answered, whatever server carries it (port), its answers counted and
logged (answers), and the deadlines of its path (deadlines)."""
