"""The real engine: one neonize (whatsmeow) client. The only package that imports neonize."""
