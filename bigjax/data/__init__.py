"""Input data: TFDS builders and the input pipeline that feeds training.

`input_pipeline` reads any prepared TFDS dataset through random access
(`tfds.data_source` over ArrayRecord) and is the only module the trainer uses.
`fashion_mnist_local` is our builder over the Debian package's idx files.
"""
