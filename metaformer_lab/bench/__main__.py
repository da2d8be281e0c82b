from metaformer_lab.bench import main

main()
