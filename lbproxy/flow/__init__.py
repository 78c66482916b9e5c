"""Flow control: hold, order and shed requests while a pool is saturated (pure logic)."""
