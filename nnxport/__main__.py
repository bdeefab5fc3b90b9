from nnxport.cli import main

main()
